"""The gallery: one config per sensible (model family x method); `--config gallery/NAME` runs one by name."""
