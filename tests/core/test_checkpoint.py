"""checkpoint: safetensors round trips, metadata checks, and files that must be refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aabl_cli.core.checkpoint import (
    TRIGGER_KEY,
    load_model,
    load_state,
    load_trigger,
    read_metadata,
    save_model,
    save_state,
    save_trigger,
)
from aabl_cli.core.errors import AablError
from aabl_cli.core.models import build_model

CLASSES = ["cat", "dog", "eel"]


def _trained_model() -> torch.nn.Module:
    """A cnn whose weights and batch-norm statistics are not the defaults."""
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=3, image_size=16, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 16, 16))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _save(path, model, **overrides):
    kwargs = dict(arch="cnn", classes=CLASSES, image_size=(16, 16), stage="train", eps=8 / 255, epochs=3,
                  seed=5, dataset_fingerprint="ab" * 32)
    kwargs.update(overrides)
    save_model(path, model, **kwargs)
    return path


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path):
    model = _trained_model()
    path = _save(tmp_path / "model.safetensors", model)
    loaded, meta = load_model(path, arch="cnn", classes=CLASSES)
    assert not loaded.training
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # weights equal bit for bit; outputs to float noise (kernels may differ per layout)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert meta["arch"] == "cnn" and meta["classes"] == CLASSES and meta["num_classes"] == 3
    assert meta["image_size"] == [16, 16] and meta["stage"] == "train" and meta["epochs"] == "3"
    assert meta["eps"] == pytest.approx(8 / 255)
    assert meta["mean"] == pytest.approx([0.4, 0.5, 0.6]) and meta["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert meta["dataset_fingerprint"] == "ab" * 32
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_metadata_has_every_spec_key(tmp_path):
    path = _save(tmp_path / "model.safetensors", _trained_model())
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert set(meta) >= {"aabl_format", "arch", "num_classes", "image_size", "channels", "mean", "std", "classes",
                         "stage", "eps", "epochs", "seed", "dataset_fingerprint", "aabl_version"}
    assert "adv_eps" not in meta  # the training budget is `eps`, as on the command line
    assert json.loads(meta["classes"]) == CLASSES
    assert read_metadata(path)["arch"] == "cnn"


def test_mismatched_arch_refused(tmp_path):
    path = _save(tmp_path / "model.safetensors", _trained_model())
    with pytest.raises(AablError, match=r"holds a cnn model but --arch is resnet18"):
        load_model(path, arch="resnet18")


@pytest.mark.parametrize("classes", [["cat", "dog"], ["cat", "dog", "fox"], ["dog", "cat", "eel"]])
def test_mismatched_classes_refused(tmp_path, classes):
    path = _save(tmp_path / "model.safetensors", _trained_model())
    with pytest.raises(AablError, match="trained on classes"):
        load_model(path, classes=classes)


def test_pickle_renamed_safetensors_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(_trained_model().state_dict(), path)
    with pytest.raises(AablError, match="not a safetensors file"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"hello world, not a checkpoint", b"\xff" * 64])
def test_garbage_refused(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(AablError, match="safetensors"):
        load_model(path)


def test_missing_checkpoint_refused(tmp_path):
    with pytest.raises(AablError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


def test_safetensors_without_aabl_metadata_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in _trained_model().state_dict().items()}, str(path))
    with pytest.raises(AablError, match="not an aabl checkpoint"):
        load_model(path)
    path2 = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path2), metadata={"format": "pt"})
    with pytest.raises(AablError, match="not an aabl checkpoint"):
        read_metadata(path2)


def _tamper(path, edit):
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors, meta = edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def _shape(tensors, meta):
    key = "net.head.1.weight"
    tensors[key] = torch.zeros(4, tensors[key].shape[1])
    return tensors, meta


def _transposed(tensors, meta):
    key = "net.features.0.0.weight"
    tensors[key] = tensors[key].transpose(0, 1).contiguous()
    return tensors, meta


def _dtype(tensors, meta):
    tensors["net.head.1.bias"] = tensors["net.head.1.bias"].double()
    return tensors, meta


def _missing(tensors, meta):
    del tensors["net.head.1.bias"]
    return tensors, meta


def _extra(tensors, meta):
    tensors["net.backdoor"] = torch.zeros(3)
    return tensors, meta


def _nan(tensors, meta):
    tensors["net.head.1.bias"] = torch.full_like(tensors["net.head.1.bias"], float("nan"))
    return tensors, meta


def _class_count(tensors, meta):
    meta["num_classes"] = "4"
    meta["classes"] = json.dumps(CLASSES + ["fox"])
    return tensors, meta


@pytest.mark.parametrize("edit", [_shape, _transposed, _dtype, _missing, _extra, _nan, _class_count],
                         ids=lambda f: f.__name__.strip("_"))
def test_tampered_tensors_refused(tmp_path, edit):
    path = _save(tmp_path / "model.safetensors", _trained_model())
    _tamper(path, edit)
    with pytest.raises(AablError, match="tensors do not match"):
        load_model(path)


@pytest.mark.parametrize(("key", "value", "message"), [("classes", "not json", "metadata is malformed"),
                                                       ("image_size", "[16]", "metadata is malformed"),
                                                       ("num_classes", "x", "metadata is malformed"),
                                                       ("arch", "transformer9000", "unknown architecture")])
def test_malformed_metadata_refused(tmp_path, key, value, message):
    path = _save(tmp_path / "model.safetensors", _trained_model())

    def edit(tensors, meta):
        meta[key] = value
        return tensors, meta

    _tamper(path, edit)
    with pytest.raises(AablError, match=message):
        load_model(path)


def test_a_checkpoint_of_an_earlier_version_with_adv_eps_still_loads(tmp_path):
    """Earlier versions recorded the training budget as `adv_eps`; it loads as `eps`."""
    model = _trained_model()
    path = _save(tmp_path / "model.safetensors", model)

    def older(tensors, meta):
        meta["adv_eps"] = meta.pop("eps")
        return tensors, meta

    _tamper(path, older)
    loaded, meta = load_model(path, arch="cnn", classes=CLASSES)
    assert meta["eps"] == pytest.approx(8 / 255) and "adv_eps" not in meta
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_resume_state_round_trip(tmp_path):
    model = _trained_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = model(torch.rand(4, 3, 16, 16)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    gen = torch.Generator().manual_seed(11)
    torch.rand(3, generator=gen)
    path = tmp_path / "state.safetensors"
    save_state(path, optimizer=opt, epoch=4, rng=torch.get_rng_state(), generator=gen.get_state(),
               meta={"resume_key": "k"})

    fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.1)
    epoch, rng, gen_state, meta = load_state(path, fresh)
    assert epoch == 4 and meta["resume_key"] == "k"
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(gen_state, gen.get_state())
    assert fresh.param_groups[0]["lr"] == 0.1 and fresh.param_groups[0]["momentum"] == 0.9
    params = list(model.parameters())
    for p in params:
        assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_damaged_resume_state_refused(tmp_path):
    path = tmp_path / "state.safetensors"
    path.write_bytes(b"nope")
    model = _trained_model()
    with pytest.raises(AablError, match="resume state is damaged"):
        load_state(path, torch.optim.SGD(model.parameters(), lr=0.1))


def test_trigger_files_name_their_backdoor_and_older_ones_still_load(tmp_path):
    """A trigger file records its backdoor (`backdoor`; earlier versions wrote `attack`) and loads only as that."""
    tensors = {"pattern.w": torch.arange(6.0).view(2, 3)}
    path = tmp_path / "trigger.safetensors"
    save_trigger(path, tensors, backdoor="iab", settings={"epochs": 1})
    loaded, settings = load_trigger(path, backdoor="iab")
    assert torch.equal(loaded["pattern.w"], tensors["pattern.w"]) and settings == {"epochs": 1}
    with pytest.raises(AablError, match="holds a iab trigger, not ssba"):
        load_trigger(path, backdoor="ssba")

    def older(tensors, meta):
        record = json.loads(meta[TRIGGER_KEY])
        record["attack"] = record.pop("backdoor")
        return tensors, {TRIGGER_KEY: json.dumps(record)}

    _tamper(path, older)
    assert load_trigger(path, backdoor="iab")[1] == {"epochs": 1}
    with pytest.raises(AablError, match="holds a iab trigger, not ssba"):
        load_trigger(path, backdoor="ssba")
