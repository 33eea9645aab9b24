"""The three A-ABL stages called as Python functions instead of commands.

    python examples/python_api.py DATA [WORKDIR] [--arch cnn] [--epochs N]

Every stage is an importable function whose keyword options match the command's flags.
"""

from __future__ import annotations

import argparse

from aabl_cli.scan import scan
from aabl_cli.split import describe, split
from aabl_cli.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("workdir", nargs="?", default="aabl-out")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    scanned = scan(args.data, workdir=args.workdir, arch=args.arch, epochs=args.epochs)
    print(f"naive model: {scanned['clean_acc']:.1%} clean, {scanned['adv_acc']:.1%} under iFGSM")
    summary = split(workdir=args.workdir)  # Otsu with the 10 % floor
    print(describe(summary))
    trained = train(workdir=args.workdir, arch=args.arch, epochs=args.epochs, eps=8 / 255)
    print(f"robust model: train accuracy {trained['final']['train_acc']:.1%} -> {args.workdir}/train/")


if __name__ == "__main__":
    main()
