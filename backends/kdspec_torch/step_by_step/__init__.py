"""Distilling Step-by-Step (Hsieh et al. 2023, arXiv:2305.02301) on the torch backend.

`prompts` builds few-shot chain-of-thought prompts and parses rationales and labels out of the
teacher's text; `local_teacher` and `http_teacher` are the two kinds of teacher;
`rationales_node` is the `rationales` node runner; `objective` the `step_by_step` training
objective (multitask and single-task) and the label-only SFT baseline on teacher labels.
"""
