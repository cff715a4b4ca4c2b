"""The classifier's side: building one (torchvision or timm) and its checkpoints (`models`, `checkpoints`), scoring it
on real test sets (`evaluate`) and auditing what it leaks about its training images (`privacy`)."""
