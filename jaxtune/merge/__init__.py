"""Model merging: mergekit's linear, slerp, task_arithmetic, ties, dare_linear and dare_ties, streamed tensor by tensor.

    jaxtune merge --config merge.yml --out DIR

`config` reads the recipe (mergekit's YAML), `sources` opens the models (HF directories, PEFT
adapters over a base), `methods` merges one tensor, `run` streams them into the output
(`run.merge(config.load(path), out_dir)` from Python).
"""
