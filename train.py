"""`python train.py ...` from a checkout is `streamsynth train ...`: the training loop is streamsynth/train.py."""

from streamsynth.train import cli

if __name__ == "__main__":
    cli()
