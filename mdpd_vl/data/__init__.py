"""Datasets over the canonical index, transforms, video frames, collate functions, the format readers
(`prep/`) and the synthetic shapes world. Contracts: mdpd_vl/README.md ('Data'); guide: data/README.md.
Nothing is imported here, so that `import mdpd_vl.data.prep` stays light."""
