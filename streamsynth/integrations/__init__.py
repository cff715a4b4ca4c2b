"""Where users plug the stream in. `lightning`: a `LightningDataModule` (import it only with Lightning installed).
timm's `create_loader` and pytorch/examples' ImageNet script take the stream as it is: their recipes are in
docs/integrations.md, tested in tests/test_integrations.py and tests/test_dropin.py."""
