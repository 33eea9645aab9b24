"""aabl's APGD-CE against IBM's adversarial-robustness-toolbox (ART), and PGD-10 and AutoAttack's
white-box part beside them, on one small trained model.

    OMP_NUM_THREADS=1 python benchmarks/apgd_check.py [--images 200] [--eps 6/255] [--steps 100]
        [--md benchmarks/APGD.md]

Trains the small CNN (width 8) for a few seconds on the generated 16-px shapes of
`core.synthetic` (10 classes), then measures robust accuracy on fresh images of the same
kind: PGD-10 (step 2/255), aabl's APGD-CE and AutoAttack white-box part
(`core.accuracy.predict`, as `aabl evaluate --attack apgd|autoattack` runs them), and,
when ART is importable, ART's `AutoProjectedGradientDescent` with the same budget,
iterations, initial step (2 x eps) and one random start, on the same folded model
(`core.fuse.AttackView`), with all images in one batch. ART works on numpy arrays through
its `PyTorchClassifier`, so every iteration copies the batch out of torch and back; it
also spends a second forward pass per iteration on the loss. Times are wall-clock seconds
on the CPU with one thread; prints a Markdown table and, with --md, appends it there.
ART is not a dependency of aabl: install it beside it to compare (`pip install
adversarial-robustness-toolbox`).
"""

from __future__ import annotations

import argparse
import time
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from cli_runner import device_name, publish

from aabl_cli.core.accuracy import predict
from aabl_cli.core.attacks import Threat
from aabl_cli.core.fuse import AttackView
from aabl_cli.core.models import Classifier, SmallCNN
from aabl_cli.core.synthetic import make_shapes

CPU = torch.device("cpu")


def _tensors(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_shapes(per_class, size=16, seed=seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def train(per_class: int, epochs: int, seed: int) -> torch.nn.Module:
    """The small CNN, width 8, trained with Adam on `per_class` shapes of each class."""
    torch.manual_seed(seed)
    x, y = _tensors(per_class, seed)
    model = Classifier(SmallCNN(10, width=8), [0.5] * 3, [0.25] * 3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(50):
            loss = F.cross_entropy(model(x[idx].float() / 255), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def ours(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: Threat,
         seed: int) -> tuple[torch.Tensor, float]:
    """Which images stay classified right under `threat` through aabl, and the seconds it took."""
    started = time.perf_counter()
    pred = predict(model, images, device=CPU, batch_size=len(images), threat=threat, labels=labels,
                   generator=torch.Generator().manual_seed(seed))
    return pred == labels, time.perf_counter() - started


def art_apgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, steps: int,
             seed: int) -> tuple[torch.Tensor, float] | None:
    """The same under ART's APGD-CE, or None without ART."""
    try:
        from art.attacks.evasion import AutoProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        return None
    view = AttackView(model).eval()
    classifier = PyTorchClassifier(model=view, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(images.shape[1:]),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    attack = AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                          targeted=False, nb_random_init=1, batch_size=len(images),
                                          loss_type="cross_entropy", verbose=False)
    np.random.seed(seed)
    x, y = (images.float() / 255).numpy(), labels.numpy()
    started = time.perf_counter()
    x_adv = attack.generate(x, y)
    pred = classifier.predict(x_adv, batch_size=len(images)).argmax(axis=1)
    seconds = time.perf_counter() - started
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    return torch.from_numpy(pred) == labels, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="Test images (a multiple of 10).")
    parser.add_argument("--eps", default="6/255", help="L-inf budget.")
    parser.add_argument("--steps", type=int, default=100, help="APGD iterations.")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--md", default=None, help="Append the table to this Markdown file.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    eps = float(Fraction(args.eps))

    model = train(args.train_per_class, args.epochs, args.seed)
    images, labels = _tensors(args.images // 10, args.seed + 1)
    clean = (predict(model, images, device=CPU) == labels).float().mean().item()
    rows = [("PGD-10 (step 2/255)", "aabl", Threat(eps=eps, step_size=2 / 255, steps=10)),
            ("APGD-CE", "aabl", Threat(eps=eps, steps=args.steps, attack="apgd")),
            ("APGD-CE + APGD-T (9 targets)", "aabl", Threat(eps=eps, steps=args.steps, attack="autoattack"))]
    results = [(name, side, threat.steps, *ours(model, images, labels, threat, args.seed))
               for name, side, threat in rows]
    art = art_apgd(model, images, labels, eps=eps, steps=args.steps, seed=args.seed)
    if art is not None:
        results.insert(2, ("APGD-CE", "ART 1.20 `AutoProjectedGradientDescent`", args.steps, *art))

    lines = [f"{args.images} generated 16-px shapes, 10 classes, small CNN (width 8) trained {args.epochs} epochs: "
             f"clean accuracy {100 * clean:.1f} %; eps {args.eps}, {device_name('cpu')}, one thread.", "",
             "| attack | implementation | iterations | robust accuracy | seconds |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {side} | {steps} | {100 * robust.float().mean().item():.1f} % | {seconds:.1f} |"
              for name, side, steps, robust, seconds in results]
    if art is None:
        lines += ["", "ART is not installed here: its row is missing."]
    else:
        mine = results[1][3]
        lines += ["", f"Images robust to one APGD-CE and not the other: aabl only {int((mine & ~art[0]).sum())}, "
                      f"ART only {int((art[0] & ~mine).sum())}."]
    publish(lines, args.md)


if __name__ == "__main__":
    main()
