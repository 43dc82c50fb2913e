"""Weight loading: MiT layouts, official THE-Mask names, stage 1 → 2, our own file format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from weights_oracles import convert_mit_state_dict, mit_ours_to_original, to_official_state_dict

from themask.modeling.build import build_model, preset_config
from themask.modeling.mit import MixTransformer
from themask.warm_start import load_stage1_into_temporal
from themask.weights import load_backbone_weights, load_model, read_state_dict, save_model
from themask.weights.mit import detect_mit_layout
from themask.weights.official import (
    convert_official_state_dict,
    infer_model_config,
    infer_num_classes,
)

DIMS, DEPTHS, HEADS = (8, 16, 24, 32), (1, 2, 1, 1), (1, 2, 3, 4)
SR = (8, 4, 2, 1)


def tiny_mit() -> MixTransformer:
    return MixTransformer(embed_dims=DIMS, depths=DEPTHS, num_heads=HEADS)


def random_original_mit(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the original SegFormer layout (docs/WEIGHTS.md §2)."""
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple] = {}
    previous = 3
    for s, (c, depth, sr) in enumerate(zip(DIMS, DEPTHS, SR), start=1):
        k = 7 if s == 1 else 3
        shapes[f"patch_embed{s}.proj.weight"] = (c, previous, k, k)
        shapes[f"patch_embed{s}.proj.bias"] = (c,)
        shapes[f"patch_embed{s}.norm.weight"] = shapes[f"patch_embed{s}.norm.bias"] = (c,)
        for j in range(depth):
            b = f"block{s}.{j}"
            linears = {
                "attn.q": (c, c),
                "attn.kv": (2 * c, c),
                "attn.proj": (c, c),
                "mlp.fc1": (4 * c, c),
                "mlp.fc2": (c, 4 * c),
            }
            for name, shape in linears.items():
                shapes[f"{b}.{name}.weight"], shapes[f"{b}.{name}.bias"] = shape, shape[:1]
            for norm in ("norm1", "norm2") + (("attn.norm",) if sr > 1 else ()):
                shapes[f"{b}.{norm}.weight"] = shapes[f"{b}.{norm}.bias"] = (c,)
            if sr > 1:
                shapes[f"{b}.attn.sr.weight"], shapes[f"{b}.attn.sr.bias"] = (c, c, sr, sr), (c,)
            shapes[f"{b}.mlp.dwconv.dwconv.weight"] = (4 * c, 1, 3, 3)
            shapes[f"{b}.mlp.dwconv.dwconv.bias"] = (4 * c,)
        shapes[f"norm{s}.weight"] = shapes[f"norm{s}.bias"] = (c,)
        previous = c
    shapes["head.weight"], shapes["head.bias"] = (10, DIMS[-1]), (10,)
    return {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def to_hf(original: dict) -> dict:
    """Original → Hugging Face names (docs/WEIGHTS.md §4), written independently here."""
    out = {}
    for key, value in original.items():
        parts = key.split(".")
        if key.startswith("head."):
            out["classifier." + parts[1]] = value
        elif key.startswith("patch_embed"):
            i = int(parts[0][len("patch_embed") :]) - 1
            sub = {"proj": "proj", "norm": "layer_norm"}[parts[1]]
            out[f"segformer.encoder.patch_embeddings.{i}.{sub}.{parts[2]}"] = value
        elif key.startswith("norm"):
            out[f"segformer.encoder.layer_norm.{int(parts[0][4:]) - 1}.{parts[1]}"] = value
        else:
            i, j, param = int(parts[0][5:]) - 1, parts[1], parts[-1]
            inner = ".".join(parts[2:-1])
            prefix = f"segformer.encoder.block.{i}.{j}"
            if inner == "attn.kv":
                c = value.shape[0] // 2
                out[f"{prefix}.attention.self.key.{param}"] = value[:c]
                out[f"{prefix}.attention.self.value.{param}"] = value[c:]
                continue
            names = {
                "norm1": "layer_norm_1",
                "norm2": "layer_norm_2",
                "attn.q": "attention.self.query",
                "attn.sr": "attention.self.sr",
                "attn.norm": "attention.self.layer_norm",
                "attn.proj": "attention.output.dense",
                "mlp.fc1": "mlp.dense1",
                "mlp.fc2": "mlp.dense2",
                "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
            }
            out[f"{prefix}.{names[inner]}.{param}"] = value
    return out


def to_mmseg(original: dict) -> dict:
    """Original → mmseg 1.x names (docs/WEIGHTS.md §5), written independently here."""
    out = {}
    for key, value in original.items():
        parts = key.split(".")
        if key.startswith("head."):
            continue
        if key.startswith("patch_embed"):
            i = int(parts[0][len("patch_embed") :]) - 1
            sub = {"proj": "projection", "norm": "norm"}[parts[1]]
            out[f"layers.{i}.0.{sub}.{parts[2]}"] = value
        elif key.startswith("norm"):
            out[f"layers.{int(parts[0][4:]) - 1}.2.{parts[1]}"] = value
        else:
            i, j, param = int(parts[0][5:]) - 1, parts[1], parts[-1]
            inner = ".".join(parts[2:-1])
            prefix = f"layers.{i}.1.{j}"
            if inner == "attn.kv":
                continue
            if inner == "attn.q":
                kv = original[f"block{i + 1}.{j}.attn.kv.{param}"]
                out[f"{prefix}.attn.attn.in_proj_{param}"] = torch.cat([value, kv])
                continue
            names = {
                "norm1": "norm1",
                "norm2": "norm2",
                "attn.sr": "attn.sr",
                "attn.norm": "attn.norm",
                "attn.proj": "attn.attn.out_proj",
                "mlp.fc1": "ffn.layers.0",
                "mlp.dwconv.dwconv": "ffn.layers.1",
                "mlp.fc2": "ffn.layers.4",
            }
            if inner in ("mlp.fc1", "mlp.fc2") and param == "weight":
                value = value[:, :, None, None]
            out[f"{prefix}.{names[inner]}.{param}"] = value
    return out


def _save(path, state_dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def original():
    return random_original_mit()


@pytest.fixture
def layout_files(tmp_path, original):
    hf_dir = tmp_path / "nvidia-mit-tiny"
    hf_dir.mkdir()
    return {
        "original": _save(tmp_path / "mit_tiny.pth", original),
        "original_wrapped": _save(
            tmp_path / "seg.pth",
            {"meta": {"epoch": 3}, "state_dict": {f"backbone.{k}": v for k, v in original.items()}},
        ),
        "huggingface": _save(hf_dir / "pytorch_model.bin", to_hf(original)).parent,
        "mmseg": _save(tmp_path / "mit_mmseg.pth", {"state_dict": to_mmseg(original)}),
        "safetensors": _save(tmp_path / "mit.safetensors", to_mmseg(original)),
        "huggingface_safetensors": _save(
            hf_dir.with_name("hf-st") / "model.safetensors", to_hf(original)
        ).parent,
        "ddp_module_prefix": _save(
            tmp_path / "ddp.pt", {"model": {f"module.{k}": v for k, v in original.items()}}
        ),
    }


def test_all_layouts_load_identical_weights(layout_files, original):
    loaded = {}
    for name, path in layout_files.items():
        model = tiny_mit()
        load_backbone_weights(model, path)
        loaded[name] = model.state_dict()
    reference = loaded["original"]
    for name, state in loaded.items():
        for key in reference:
            torch.testing.assert_close(state[key], reference[key], rtol=0, atol=0, msg=name)
    # Every original tensor (except the ImageNet head) sits somewhere in the model, exactly once.
    flat = {key: value for key, value in reference.items()}
    for key, value in original.items():
        if key.startswith("head."):
            continue
        if key.endswith("attn.kv.weight"):
            prefix = key[: -len(".attn.kv.weight")]
            s, j = int(prefix.split(".")[0][5:]) - 1, prefix.split(".")[1]
            torch.testing.assert_close(flat[f"stages.{s}.blocks.{j}.attn.kv.weight"], value)
        hits = [k for k, v in flat.items() if v.shape == value.shape and torch.equal(v, value)]
        assert len(hits) == 1, (key, hits)
    assert len(flat) == len(original) - 2


def test_spot_checks_of_the_mapping(original):
    ours = convert_mit_state_dict(original)
    assert torch.equal(
        ours["stages.0.blocks.0.attn.sr_norm.weight"], original["block1.0.attn.norm.weight"]
    )
    assert torch.equal(
        ours["stages.1.blocks.1.mlp.dwconv.weight"], original["block2.1.mlp.dwconv.dwconv.weight"]
    )
    assert torch.equal(ours["stages.3.norm.bias"], original["norm4.bias"])
    assert torch.equal(
        ours["stages.2.patch_embed.norm.weight"], original["patch_embed3.norm.weight"]
    )
    hf = convert_mit_state_dict(to_hf(original))
    assert torch.equal(hf["stages.1.blocks.0.attn.kv.bias"], original["block2.0.attn.kv.bias"])
    assert torch.equal(hf["stages.1.blocks.0.attn.kv.weight"], original["block2.0.attn.kv.weight"])


def test_original_round_trip_is_exact(original):
    back = mit_ours_to_original(convert_mit_state_dict(original))
    expected = {k: v for k, v in original.items() if not k.startswith("head.")}
    assert back.keys() == expected.keys()
    for key in expected:
        assert torch.equal(back[key], expected[key])


def test_detect_layout(original):
    assert detect_mit_layout(original) == "original"
    assert (
        detect_mit_layout(
            {
                k[len("segformer.") :]: v
                for k, v in to_hf(original).items()
                if k.startswith("segformer.")
            }
        )
        == "huggingface"
    )
    assert detect_mit_layout(to_mmseg(original)) == "mmseg"
    assert detect_mit_layout(tiny_mit().state_dict()) == "themask"
    with pytest.raises(ValueError, match="sentinel"):
        detect_mit_layout({"foo.weight": torch.zeros(1)})


def test_missing_key_is_named(tmp_path, original):
    broken = dict(original)
    del broken["block2.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys:\n  stages\.1\.blocks\.1\.mlp\.fc2\.bias"):
        load_backbone_weights(tiny_mit(), _save(tmp_path / "a.pth", broken))


def test_mis_shaped_key_is_named(tmp_path, original):
    broken = dict(original)
    broken["patch_embed2.proj.weight"] = torch.zeros(16, 8, 5, 5)
    with pytest.raises(
        ValueError,
        match=r"stages\.1\.patch_embed\.proj\.weight: expected \(16, 8, 3, 3\), "
        r"got \(16, 8, 5, 5\)",
    ):
        load_backbone_weights(tiny_mit(), _save(tmp_path / "a.pth", broken))


def test_extra_keys_are_named(tmp_path, original):
    extra_block = dict(original)
    extra_block["block4.1.norm1.weight"] = torch.zeros(32)
    with pytest.raises(
        ValueError, match=r"unexpected keys:\n  stages\.3\.blocks\.1\.norm1\.weight"
    ):
        load_backbone_weights(tiny_mit(), _save(tmp_path / "a.pth", extra_block))
    unknown = dict(original)
    unknown["block1.0.attn.rope.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"block1\.0\.attn\.rope\.weight"):
        load_backbone_weights(tiny_mit(), _save(tmp_path / "b.pth", unknown))
    hf = to_hf(original)
    del hf["segformer.encoder.block.0.0.attention.self.value.bias"]
    with pytest.raises(ValueError, match=r"block1\.0\.attn\.kv\.bias lacks its value half"):
        convert_mit_state_dict(hf)


def test_head_is_dropped_and_model_mismatch_is_reported(tmp_path, original):
    path = _save(tmp_path / "a.pth", original)
    assert "head.weight" in read_state_dict(path)
    wider = MixTransformer(embed_dims=(8, 16, 24, 40), depths=DEPTHS, num_heads=HEADS)
    with pytest.raises(ValueError, match="mis-shaped keys"):
        load_backbone_weights(wider, path)


class _Pickled:
    """A non-tensor object a weights-only load must refuse."""


def test_read_state_dict_refuses_pickled_objects(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "meta": {"obj": _Pickled()}}, path)
    with pytest.raises(ValueError, match=r"_Pickled, which a safe \(weights-only\) load refuses"):
        read_state_dict(path)
    # the message's recipe for a trusted file: allow the class, re-save the state dict, safely
    with torch.serialization.safe_globals([_Pickled]):
        state = torch.load(path, weights_only=True)["state_dict"]
    torch.save(state, tmp_path / "clean.pth")
    assert torch.equal(read_state_dict(tmp_path / "clean.pth")["a"], torch.zeros(1))


def test_read_state_dict_rejects_unknown_files(tmp_path):
    (tmp_path / "w.ckpt").write_bytes(b"xx")
    with pytest.raises(ValueError, match="unknown weights format"):
        read_state_dict(tmp_path / "w.ckpt")
    with pytest.raises(FileNotFoundError, match="directory holds none"):
        read_state_dict(tmp_path)


def _hf_model_dir(transformers, original, directory):
    """A local ``nvidia/mit-*``-style directory: config.json + pytorch_model.bin."""
    config = transformers.SegformerConfig(
        num_channels=3,
        num_encoder_blocks=4,
        depths=list(DEPTHS),
        sr_ratios=list(SR),
        hidden_sizes=list(DIMS),
        patch_sizes=[7, 3, 3, 3],
        strides=[4, 2, 2, 2],
        num_attention_heads=list(HEADS),
        mlp_ratios=[4, 4, 4, 4],
        hidden_act="gelu",
        drop_path_rate=0.0,
        num_labels=10,
    )
    config.save_pretrained(directory)
    torch.save(to_hf(original), directory / "pytorch_model.bin")
    return directory


def test_features_match_transformers_segformer(tmp_path, original):
    transformers = pytest.importorskip("transformers")
    directory = _hf_model_dir(transformers, original, tmp_path / "hf")
    hf_model = transformers.SegformerModel.from_pretrained(directory).double().eval()
    # HF builds the block and stage-final norms with eps 1e-5; the original (and ours) use 1e-6.
    for name, module in hf_model.named_modules():
        keeps_default = "patch_embed" in name or ("attention" in name and "layer_norm" in name)
        if isinstance(module, torch.nn.LayerNorm) and not keeps_default:
            module.eps = 1e-6
    ours = tiny_mit()
    load_backbone_weights(ours, directory)
    ours = ours.double().eval()
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    with torch.no_grad():
        expected = hf_model(pixel_values=x, output_hidden_states=True).hidden_states
        features = ours(x)
    assert len(expected) == 4
    for a, b in zip(features, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for p in hf_model.parameters()
    )
    # What transformers itself writes (save_pretrained) loads too, with identical weights.
    hf_model.float().save_pretrained(tmp_path / "resaved")
    again = tiny_mit()
    load_backbone_weights(again, tmp_path / "resaved")
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, ours.state_dict()[key].float(), rtol=0, atol=0)


# --------------------------------------------------------------------------- full models

REFERENCE_DIR = Path(__file__).parent / "data"
UNUSED_OFFICIAL = (
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
    "decode_head.criterion.empty_weight",
    "decode_head.predictor.deformabel_transformer_cross_attention_layers.reference_points.weight",
    "decode_head.predictor.deformabel_transformer_cross_attention_layers.reference_points.bias",
)


def _randomised(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def _reference_keys(name):
    """{key: shape} parsed from tests/data/official_keys_<name>.txt."""
    keys = {}
    for line in (REFERENCE_DIR / f"official_keys_{name}.txt").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        keys[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return keys


@pytest.mark.parametrize("preset", ["themask_tiny_t1", "themask_tiny_t2"])
def test_official_round_trip_is_lossless_and_strict(preset):
    model = _randomised(build_model(preset, num_classes=5), seed=1)
    official = to_official_state_dict(model.state_dict())
    assert all(key.startswith(("backbone.", "decode_head.")) for key in official)
    # the keys the official forward never reads are accepted and dropped
    official_with_unused = dict(official)
    for key in UNUSED_OFFICIAL:
        official_with_unused[key] = torch.zeros(3)
    converted = convert_official_state_dict(official_with_unused)
    fresh = build_model(preset, num_classes=5)
    fresh.load_state_dict(converted, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert infer_num_classes(official) == 5


def test_unknown_official_keys_are_named():
    official = to_official_state_dict(build_model("themask_tiny_t1").state_dict())
    official["decode_head.predictor.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"decode_head\.predictor\.extra_head\.weight"):
        convert_official_state_dict(official)


@pytest.mark.parametrize("stage", ["t1", "t2"])
def test_official_names_and_shapes_equal_the_reference_lists(stage):
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(f"themask_mit_b1_{stage}")
    ours = {k: tuple(v.shape) for k, v in to_official_state_dict(model.state_dict()).items()}
    reference = _reference_keys(f"mit_b1_{stage}")
    expected = {k: v for k, v in reference.items() if k not in UNUSED_OFFICIAL}
    assert set(reference) - set(expected) <= set(UNUSED_OFFICIAL)
    assert ours == expected
    # an official checkpoint's layout (as listed) is recognised
    meta = {k: torch.empty(shape, device="meta") for k, shape in reference.items()}
    assert infer_model_config(meta) == preset_config(f"themask_mit_b1_{stage}")
    assert infer_num_classes(meta) == 124


def test_infer_model_config_distinguishes_variants():
    for name in ("themask_mit_b0_t2", "themask_mit_b2_t1", "themask_mit_b5_t1"):
        with torch.device("meta"):
            model = build_model(name, num_classes=9)
        assert infer_model_config(model.state_dict()) == preset_config(name, num_classes=9)
    tiny_t1 = preset_config("themask_tiny_t1")
    assert infer_model_config(build_model("mask2former_tiny").state_dict()) == tiny_t1
    tiny_t2 = preset_config("themask_tiny_t2")
    assert infer_model_config(build_model("themask_tiny_t2").state_dict()) == tiny_t2
    with pytest.raises(ValueError, match="no preset has this architecture"):
        infer_model_config(build_model("themask_tiny_t1", decoder_layers=2).state_dict())


@pytest.fixture(scope="module")
def stage1():
    return _randomised(build_model("themask_tiny_t1", num_classes=5), seed=2).state_dict()


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_stage1_into_temporal_official_init(stage1, layout):
    model = _randomised(build_model("themask_tiny_t2", num_classes=5), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = stage1 if layout == "ours" else to_official_state_dict(stage1)
    load_stage1_into_temporal(model, source, head_init="official")
    after = model.state_dict()
    fresh_prefixes = ("decoder.temporal.", "decoder.frame_head.", "decoder.clip_head.norm.")
    for key, value in after.items():
        expected = before[key] if key.startswith(fresh_prefixes) else stage1[key]
        assert torch.equal(value, expected), key
    assert torch.equal(
        after["decoder.clip_head.class_embed.weight"],
        stage1["decoder.clip_head.class_embed.weight"],
    )


def test_stage1_into_temporal_copy_init(stage1):
    model = _randomised(build_model("themask_tiny_t2", num_classes=5), seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_stage1_into_temporal(model, stage1, head_init="copy")
    after = model.state_dict()
    for key, value in after.items():
        if key.startswith("decoder.temporal."):
            expected = before[key]
        elif key.startswith("decoder.frame_head."):
            expected = stage1["decoder.clip_head." + key[len("decoder.frame_head.") :]]
        else:
            expected = stage1[key]
        assert torch.equal(value, expected), key


def test_stage1_into_temporal_rejects_bad_inputs(stage1):
    model = build_model("themask_tiny_t2", num_classes=5)
    with pytest.raises(ValueError, match="head_init"):
        load_stage1_into_temporal(model, stage1, head_init="random")
    with pytest.raises(ValueError, match="no Temporal Aggregation Decoder"):
        load_stage1_into_temporal(build_model("themask_tiny_t1", num_classes=5), stage1)
    with pytest.raises(ValueError, match="already has a temporal decoder"):
        load_stage1_into_temporal(model, model.state_dict())
    other_classes = build_model("themask_tiny_t2", num_classes=9)
    with pytest.raises(
        ValueError, match=r"decoder\.clip_head\.class_embed\.weight: expected \(10, 64\)"
    ):
        load_stage1_into_temporal(other_classes, stage1)


def test_save_and_load_model_round_trip(tmp_path):
    model = build_model("themask_tiny_t2", num_classes=7, num_frames=3).eval()
    _randomised(model, seed=5)
    path = tmp_path / "run" / "model.safetensors"
    save_model(model, path)
    loaded = load_model(path).eval()
    assert loaded.config == model.config
    assert loaded.config.backbone_depths == (1, 1, 1, 1)
    frames = torch.randn(1, 2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames), model(frames), rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp files left
    # a full themask file also serves as a backbone source (its backbone.* part)
    backbone = build_model("themask_tiny_t1").backbone
    load_backbone_weights(backbone, path)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, model.backbone.state_dict()[key]), key


def test_files_with_the_objective_in_the_model_config_still_load(tmp_path):
    """Files saved while ``ModelConfig`` held ``loss`` (a nested dict in the JSON) load."""
    import dataclasses
    import json

    model = _randomised(build_model("themask_tiny_t1", num_classes=4), seed=8).eval()
    old_config = dict(dataclasses.asdict(model.config), loss={"num_rounds": 1, "num_points": 32})
    path = tmp_path / "old.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"themask_config": json.dumps(old_config)})
    loaded = load_model(path).eval()
    assert loaded.config == model.config
    frames = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames), model(frames), rtol=0, atol=0)
    bad = dict(dataclasses.asdict(model.config), hidden_dim="wide")
    save_file(tensors, str(path), metadata={"themask_config": json.dumps(bad)})
    with pytest.raises(ValueError, match="hidden_dim"):
        load_model(path)


def test_load_model_rejects_foreign_files(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="themask_config"):
        load_model(path)


# --------------------------------------------------------------------------- themask convert


def test_convert_command_official_checkpoint_infers_preset(tmp_path, capsys):
    from themask.cli import main

    model = _randomised(build_model("themask_tiny_t2", num_classes=6), seed=6)
    src = tmp_path / "iter_12000.pth"
    torch.save(
        {"meta": {"iter": 12000}, "state_dict": to_official_state_dict(model.state_dict())}, src
    )
    dst = tmp_path / "converted.safetensors"
    assert main(["convert", str(src), str(dst)]) == 0
    assert "6 classes" in capsys.readouterr().out
    loaded = load_model(dst)
    assert loaded.config.decoder == "temporal" and loaded.num_classes == 6
    assert loaded.config.backbone_embed_dims == model.config.backbone_embed_dims
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_convert_command_mit_weights_need_a_preset(tmp_path, capsys):
    from themask.cli import main

    backbone = _randomised(build_model("themask_tiny_t1").backbone, seed=7)
    src = tmp_path / "mit_tiny.pth"
    torch.save(mit_ours_to_original(backbone.state_dict()), src)
    dst = tmp_path / "fresh.safetensors"
    assert main(["convert", str(src), str(dst)]) == 2  # a user error: one line, exit 2
    assert "name the model with a preset" in capsys.readouterr().err
    assert (
        main(["convert", str(src), str(dst), "--preset", "themask_tiny_t1", "--num-classes", "3"])
        == 0
    )
    # the stage-1 and baseline presets share one network (they differ in the objective)
    assert "preset mask2former_tiny / themask_tiny_t1, 3 classes" in capsys.readouterr().out
    loaded = load_model(dst)
    assert loaded.num_classes == 3 and loaded.config.decoder == "single"
    for key, value in backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
