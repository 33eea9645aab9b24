"""The three A-ABL stages called as Python functions instead of commands.

    python examples/python_api.py DATA [WORKDIR] [--arch cnn] [--epochs N]

Every stage is an importable function whose keyword options match the command's flags.
"""

from __future__ import annotations

import argparse

from aabl_cli.core.workdir import Workdir
from aabl_cli.stages.scan import scan
from aabl_cli.stages.split import describe, split
from aabl_cli.stages.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("workdir", nargs="?", default="aabl-out")
    parser.add_argument("--arch", default="cnn")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    scanned = scan(args.data, workdir=args.workdir, arch=args.arch, epochs=args.epochs)
    print(f"naive model: {scanned['acc']:.1%} clean, {scanned['ra']:.1%} under iFGSM")
    summary = split(workdir=args.workdir)  # Otsu with the 10 % floor
    print(describe(summary))
    trained = train(workdir=args.workdir, arch=args.arch, epochs=args.epochs, eps=8 / 255)
    print(f"robust model: train accuracy {trained['final']['train_acc']:.1%} -> {Workdir(args.workdir).train.path}/")


if __name__ == "__main__":
    main()
