"""The defences benchmarks/peers.py sets beside aabl's split, and what they are fed.

Every defence sees the images as aabl decodes them (`load_image_folder`, checked against the scan's
fingerprint), the same labels and, but for cleanlab, the same naive model, the scan's checkpoint:

- `aabl-split`: the split's own numbers (split.json); its seconds: the scan's iFGSM scoring plus the split.
- `ac-smaller`, `ac-distance`: ART's ActivationDefence (Chen et al. 2018) with its default clustering
  (2-means per class after PCA to 10 dimensions) and each of the two cluster analyses its documentation
  names, on the penultimate features.
- `spectral-true`, `spectral-0.33`: ART's SpectralSignatureDefense (Tran et al. 2018) on the penultimate
  features, the expected poison rate set to the set's true poison share (from poison.csv) and to 0.33, its
  default; eps_multiplier 1.5, its default.
- `cleanlab`: cleanlab's `find_label_issues(labels, pred_probs)` on out-of-sample predicted probabilities from
  k-fold training, its documented use. Each fold's model is trained in this process by aabl's own training
  loop with the scan's recipe (arch, epochs, Adam without weight decay at the scan's learning rate, batch,
  crop and flip, seed, precision) on the other folds (stratified by class), then predicts its fold.

ART reads the defences' activations from the last layer an ART PyTorchClassifier lists; the classifier here
wraps `FeatureHead`, the scan model's last linear layer over its input, whose last layer passes that input
on: the activations ART clusters are the model's penultimate features (the input of its last linear layer).
ART's k-means and PCA draw from numpy's global RNG, seeded with the scan's seed before each run.

A defence's flagged set is measured against poison.csv as the split measures its isolated set
(`aabl_cli.core.groundtruth.isolation_metrics`). Its seconds are its own, given the scan's naive model: ART's
include extracting the features, cleanlab's all its training.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aabl_cli import __version__
from aabl_cli.core.checkpoint import load_model
from aabl_cli.core.data import ImageDataset, load_image_folder
from aabl_cli.core.device import autocast, prepare_model, seed_everything, use_precision
from aabl_cli.core.groundtruth import POISON_CSV, isolation_metrics, read_ground_truth
from aabl_cli.core.loop import fit, sampling_generator, step_schedule
from aabl_cli.core.models import build_model, channel_stats
from aabl_cli.core.pixels import batch_to_float
from aabl_cli.core.workdir import Workdir

PACKAGES = {"art": "adversarial-robustness-toolbox", "cleanlab": "cleanlab"}  # module -> the package it comes in
BATCH = 256  # images a forward pass when extracting features or predicting


@dataclass(frozen=True)
class Peer:
    """A defence: how the tables name it, the modules it imports (PACKAGES' keys), its settings for a case
    (None: not run for it) and how it runs: `run(case, settings)` gives its numbers, `measure`'s and `seconds`,
    and whatever else it reports."""

    method: str
    needs: tuple[str, ...]
    settings: Callable[[Case, argparse.Namespace], dict[str, Any] | None]
    run: Callable[[Case, dict[str, Any]], dict[str, Any]]


class Case:
    """One poisoned set: its work directory and the scan's and split's summaries, and, decoded the first time a
    defence needs them, its images, ground truth, the scan's model and its penultimate features."""

    def __init__(self, name: str, workdir: Path, *, device: torch.device, cache_dir: Path | None) -> None:
        self.name, self.wd, self.device, self.cache_dir = name, Workdir(workdir), device, cache_dir
        for path in (self.wd.scan.json, self.wd.scan.model, self.wd.split.json):
            if not path.is_file():
                raise SystemExit(f"{name}: {path} is missing; run `aabl scan DATA --workdir {workdir}` and "
                                 f"`aabl split --workdir {workdir}` first")
        self.scan, self.split = self.wd.read("scan"), self.wd.read("split")
        self.data = Path(self.scan["data"])
        if not (self.data / POISON_CSV).is_file() or not self.split.get("ground_truth"):
            raise SystemExit(f"{name}: {self.data} holds no {POISON_CSV}; the peers are measured against the "
                             "ground truth of a set that `aabl poison` wrote")
        self.rho = float(self.split["ground_truth"]["rho"])

    @functools.cached_property
    def model_sha256(self) -> str:
        """The scan checkpoint's sha256: a stored row measured another model when it differs."""
        return hashlib.sha256(self.wd.scan.model.read_bytes()).hexdigest()

    @functools.cached_property
    def dataset(self) -> ImageDataset:
        """The scanned images, decoded as the scan decoded them (the same size, the same files left out)."""
        size = [int(v) for v in self.scan["settings"]["image_size"]]
        load = {"on_bad_file": "skip" if self.scan.get("skipped") else "error", "cache_dir": self.cache_dir,
                "quiet": True}
        dataset = load_image_folder(self.data, **load)
        if list(dataset.image_size) != size:  # the scan ran with --image-size
            dataset = load_image_folder(self.data, image_size=(size[0], size[1]), **load)
        if dataset.fingerprint != self.scan["dataset_fingerprint"]:
            raise SystemExit(f"{self.name}: the images in {self.data} changed since the scan; scan and split again")
        return dataset

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return self.dataset.labels.numpy()

    @functools.cached_property
    def poisoned(self) -> np.ndarray:
        return read_ground_truth(self.data, self.dataset.paths).astype(bool)

    @functools.cached_property
    def model(self) -> nn.Module:
        return load_model(self.wd.scan.model, device=self.device, classes=self.dataset.classes)[0]

    @functools.cached_property
    def features(self) -> tuple[np.ndarray, float]:
        """The penultimate features of every image and the seconds they took."""
        t0 = time.perf_counter()
        features = penultimate_features(self.model, self.dataset.images, device=self.device)
        return features, time.perf_counter() - t0

    def source(self) -> dict[str, Any]:
        """What every stored row of this case stands on: rows of another source are measured again."""
        return {"data": str(self.data), "dataset_fingerprint": self.scan["dataset_fingerprint"],
                "model_sha256": self.model_sha256}


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last linear layer (every aabl architecture ends in one)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def penultimate_features(model: nn.Module, images: torch.Tensor, *, device: torch.device,
                         batch_size: int = BATCH) -> np.ndarray:
    """float32 (N, D): the input of the model's last linear layer for each uint8 (N, 3, H, W) image, in eval
    mode and float32, in dataset order."""
    captured: list[torch.Tensor] = []
    hook = last_linear(model).register_forward_hook(lambda _m, args, _out: captured.append(args[0].float().cpu()))
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(batch_to_float(images[start:start + batch_size], device))
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


def measure(flagged: np.ndarray, poisoned: np.ndarray) -> dict[str, Any]:
    """A flagged set (bool (N,)) against the ground truth (bool (N,)): its size, recall, precision, rho_vul
    (the poison's share of the rest, which a defence keeps) and gamma (the share kept); recall None without poison."""
    metrics = isolation_metrics(poisoned, flagged)
    recall = metrics["recall"]
    return {"flagged": int(flagged.sum()), "recall": None if math.isnan(recall) else recall,
            "precision": metrics["precision"], "rho_vul": metrics["rho_vul"], "gamma": float((~flagged).mean())}


# ---------------------------------------------------------------- aabl's split


def split_settings(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """The split's settings and threshold, and the scan's scoring attack."""
    scan = case.scan["settings"]
    return {"split": case.split["settings"], "threshold": case.split["threshold"],
            **{k: scan[k] for k in ("eps", "step_size", "steps", "alpha", "beta")}}


def split_row(case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    """The split's numbers, from split.json: its isolated set is the flagged one."""
    truth = case.split["ground_truth"]
    return {"flagged": case.split["isolated"], "recall": truth["recall"], "precision": truth["precision"],
            "rho_vul": truth["rho_vul"], "gamma": case.split["kept_share"],
            "seconds": case.scan["seconds"]["score"] + case.split["seconds"]["total"]}


# ---------------------------------------------------------------- ART, on the penultimate features


class FeatureHead(nn.Module):
    """The scan model's last linear layer over its penultimate features: ART's PyTorchClassifier lists the top
    modules in the order they were set and its defences read the last one's output, so `features`, which passes
    the input on, is set after `linear`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def art_classifier(linear: nn.Linear) -> Any:
    """An ART PyTorchClassifier over `FeatureHead(linear)`, on the CPU: its input is a feature vector."""
    from art.estimators.classification import PyTorchClassifier

    head = FeatureHead(copy.deepcopy(linear).float().cpu())
    return PyTorchClassifier(model=head, loss=nn.CrossEntropyLoss(), input_shape=(linear.in_features,),
                             nb_classes=linear.out_features, device_type="cpu")


def _art_inputs(case: Case) -> tuple[Any, np.ndarray, np.ndarray, float]:
    """The classifier, the features, one-hot labels (as ART's examples pass them) and the features' seconds."""
    features, seconds = case.features
    classes = len(case.dataset.classes)
    return art_classifier(last_linear(case.model)), features, np.eye(classes, dtype=np.float32)[case.labels], seconds


def activation_settings(analysis: str) -> Callable[[Case, argparse.Namespace], dict[str, Any]]:
    """ActivationDefence's settings with the cluster analysis `analysis`: ART's defaults for the clustering, and
    the scan's seed for numpy's global RNG, which ART's k-means and PCA draw from."""
    return lambda case, args: {"nb_clusters": 2, "clustering_method": "KMeans", "reduce": "PCA", "nb_dims": 10,
                               "cluster_analysis": analysis, "seed": int(case.scan["settings"]["seed"])}


def activation_clustering(case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    """ART's ActivationDefence on the penultimate features: a class's images in the cluster the analysis calls
    poisonous are flagged."""
    from art.defences.detector.poison import ActivationDefence

    classifier, features, onehot, feature_seconds = _art_inputs(case)
    t0 = time.perf_counter()
    np.random.seed(settings["seed"])
    defence = ActivationDefence(classifier, features, onehot)
    _, is_clean = defence.detect_poison(**{k: v for k, v in settings.items() if k != "seed"})
    return {**measure(np.asarray(is_clean) == 0, case.poisoned),
            "seconds": time.perf_counter() - t0 + feature_seconds, "feature_seconds": feature_seconds}


def spectral_settings(rate: float | None) -> Callable[[Case, argparse.Namespace], dict[str, Any]]:
    """`rate` None: the set's true poison share."""
    return lambda case, args: {"expected_pp_poison": case.rho if rate is None else rate, "eps_multiplier": 1.5,
                               "batch_size": 128}


def spectral_signatures(case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    """ART's SpectralSignatureDefense on the penultimate features: in each class, the images scoring in the top
    eps_multiplier * expected_pp_poison along the features' top singular vector are flagged."""
    from art.defences.detector.poison import SpectralSignatureDefense

    classifier, features, onehot, feature_seconds = _art_inputs(case)
    t0 = time.perf_counter()
    _, is_clean = SpectralSignatureDefense(classifier, features, onehot, **settings).detect_poison()
    return {**measure(np.asarray(is_clean) == 0, case.poisoned),
            "seconds": time.perf_counter() - t0 + feature_seconds, "feature_seconds": feature_seconds}


# ---------------------------------------------------------------- cleanlab, on k-fold predicted probabilities


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0 .. folds-1) of each image: each class shuffled with `seed` and dealt out in turn, each class
    starting where the last one stopped, so every fold holds its share of every class, within one image."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold


def cleanlab_settings(case: Case, args: argparse.Namespace) -> dict[str, Any] | None:
    """The folds, cleanlab's filter (its default) and the scan's recipe; None with `--cleanlab-folds 0`."""
    scan = case.scan["settings"]
    if not args.cleanlab_folds or not scan["epochs"]:  # skipped, or the scan trained nothing (--model)
        return None
    return {"folds": args.cleanlab_folds, "filter_by": "prune_by_noise_rate",
            **{k: scan[k] for k in ("arch", "epochs", "lr", "batch_size", "seed", "precision")}}


def naive_model(images: torch.Tensor, labels: torch.Tensor, *, classes: int, recipe: dict[str, Any],
                device: torch.device) -> nn.Module:
    """A naive model trained as `aabl scan` trains one (Adam without weight decay, constant learning rate,
    crop and flip), on uint8 `images`, under the caller's precision."""
    seed_everything(recipe["seed"])
    mean, std = channel_stats(images)
    net = prepare_model(build_model(recipe["arch"], num_classes=classes, image_size=tuple(images.shape[2:]),
                                    mean=mean, std=std), device)
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=recipe["lr"], weight_decay=0.0)
    generator = sampling_generator(images.device, recipe["seed"])
    fit(net, images, labels, optimizer=optimizer, epochs=recipe["epochs"], batch_size=recipe["batch_size"],
        schedule=step_schedule(recipe["lr"]), device=device, generator=generator, quiet=True)
    return net.eval()


def out_of_fold_probs(dataset: ImageDataset, *, recipe: dict[str, Any], device: torch.device) -> np.ndarray:
    """float32 (N, K) softmax probabilities, each image's from the model trained without its fold."""
    labels = dataset.labels
    fold = stratified_folds(labels.numpy(), recipe["folds"], recipe["seed"])
    probs = np.zeros((len(labels), len(dataset.classes)), dtype=np.float32)
    with use_precision(recipe["precision"]):
        for k in range(recipe["folds"]):
            train = torch.from_numpy(np.flatnonzero(fold != k))
            held = np.flatnonzero(fold == k)
            net = naive_model(dataset.images[train], labels[train], classes=len(dataset.classes), recipe=recipe,
                              device=device)
            with torch.no_grad(), autocast(device):
                for start in range(0, len(held), BATCH):
                    rows = held[start:start + BATCH]
                    logits = net(batch_to_float(dataset.images[torch.from_numpy(rows)], device)).float()
                    probs[rows] = torch.softmax(logits, dim=1).cpu().numpy()
    return probs


def label_issues(case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    """cleanlab's find_label_issues on out-of-fold probabilities: the images it calls mislabelled are flagged.
    `train_seconds` is the k models' training and predictions, `out_of_fold_acc` their accuracy on their folds."""
    from cleanlab.filter import find_label_issues

    t0 = time.perf_counter()
    probs = out_of_fold_probs(case.dataset, recipe=settings, device=case.device)
    train_seconds = time.perf_counter() - t0
    # n_jobs=1: the same result as any n_jobs (cleanlab's documentation), without forking a process holding torch
    flagged = np.asarray(find_label_issues(case.labels, probs, filter_by=settings["filter_by"], n_jobs=1), dtype=bool)
    return {**measure(flagged, case.poisoned), "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
            "out_of_fold_acc": float((probs.argmax(axis=1) == case.labels).mean())}


PEERS: dict[str, Peer] = {
    "aabl-split": Peer("aabl split (Otsu on iFGSM scores)", (), split_settings, split_row),
    "ac-smaller": Peer("ART activation clustering, smaller cluster", ("art",), activation_settings("smaller"),
                       activation_clustering),
    "ac-distance": Peer("ART activation clustering, distance", ("art",), activation_settings("distance"),
                        activation_clustering),
    "spectral-true": Peer("ART spectral signatures, true poison rate", ("art",), spectral_settings(None),
                          spectral_signatures),
    "spectral-0.33": Peer("ART spectral signatures, rate 0.33 (default)", ("art",), spectral_settings(0.33),
                          spectral_signatures),
    "cleanlab": Peer("cleanlab find_label_issues, k-fold", ("cleanlab",), cleanlab_settings, label_issues),
}


def versions(needs: tuple[str, ...]) -> dict[str, str]:
    """The versions of aabl, torch and the modules a defence imports (with scikit-learn, which both use)."""
    found = {"aabl": __version__, "torch": torch.__version__}
    for module in needs:
        found[module] = importlib.import_module(module).__version__
    if needs:
        found["sklearn"] = importlib.import_module("sklearn").__version__
    return found
