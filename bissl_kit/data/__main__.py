"""``python -m bissl_kit.data prepare [--allow-apt] [--root DIR] [--no-download]``: the set-up step
(the Makefile's ``data`` target) that makes Fashion-MNIST available and prints where it is."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import data as package
from .fashion_mnist import DEBIAN_PACKAGE, _read_fashion_mnist, prepare_fashion_mnist
from .registry import DataNotFoundError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bissl_kit.data", description=package.__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="Make Fashion-MNIST available and print where it is.")
    prep.add_argument("--root", default=None,
                      help="Directory that should hold FashionMNIST/raw; default $BISSL_DATA, else <repo>/data.")
    prep.add_argument("--allow-apt", action="store_true",
                      help=f"If nothing else works, install the Debian package {DEBIAN_PACKAGE} with apt-get "
                           "(only when running as root and apt-get exists).")
    prep.add_argument("--no-download", action="store_true", help="Do not try a torchvision download.")
    args = parser.parse_args(argv)
    target = args.root if args.root is not None else os.environ.get("BISSL_DATA") or None
    if target is not None:  # the folder prepare is asked to fill may be new
        Path(target).expanduser().mkdir(parents=True, exist_ok=True)
    try:
        found = prepare_fashion_mnist(allow_apt=args.allow_apt, root=args.root, download=not args.no_download)
        _read_fashion_mnist(found, train=False)  # cheap check that the files are readable
    except DataNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"Fashion-MNIST: {found / 'FashionMNIST' / 'raw'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
