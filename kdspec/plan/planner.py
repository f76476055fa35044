"""Spec -> Plan: nodes per stage, references resolved, order, fingerprints, checks, estimates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import Spec
from ..spec.errors import Diagnostic, KeyPath
from ..spec.stages import EvalStage, TeacherStage, TrainStage
from ..spec.stages.minillm import MiniLLMStage
from ..spec.stages.pretrain_kd import PretrainKDStage
from ..spec.stages.sft import SFTStage
from ..spec.stages.step_by_step import StepByStepStage
from .fingerprint import canonical_json, fingerprint
from .graph import Node, Plan
from .order import topological_order
from .resolve import ResolveError, did_you_mean, resolve_model, student_ref

# Fields that describe a stage but do not change what it computes.
_COSMETIC = ("description", "after", "log_every")


@dataclass
class _Builder:
    spec: Spec
    base_dir: Path
    locate: Any  # Callable[[KeyPath], Location | None]
    nodes: dict[str, Node] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, path: KeyPath, message: str, hint: str | None = None,
              severity: str = "error") -> None:
        self.diagnostics.append(
            Diagnostic(message, path, self.locate(path), hint, severity)  # type: ignore[arg-type]
        )

    def model(self, path: KeyPath, ref: str) -> dict[str, Any] | None:
        """Resolve a model reference to its config entry; record an error if it names nothing.
        `path` starts with ("stages", index): a stage may only use earlier stages' outputs."""
        try:
            origin = resolve_model(self.spec, ref, used_by=path[1])
        except ResolveError as err:
            self.error(path, str(err), err.hint)
            return None
        if origin.kind == "stage":
            return {"stage": origin.name}
        return {"model": origin.name, **self.spec.models[origin.name].model_dump(mode="json")}

    def data(self, path: KeyPath, name: str) -> dict[str, Any] | None:
        if name not in self.spec.data:
            self.error(path, f"no data source named `{name}`",
                       did_you_mean(name, list(self.spec.data)))
            return None
        return {"name": name, **self.spec.data[name].model_dump(mode="json")}


def _stage_config(stage: Any) -> dict[str, Any]:
    config = stage.model_dump(mode="json")
    for key in _COSMETIC:
        config.pop(key, None)
    return config


def _add(builder: _Builder, node: Node) -> Node:
    builder.nodes[node.id] = node
    return node


def _model_inputs(node: Node, role: str, resolved: dict[str, Any] | None) -> None:
    if resolved and "stage" in resolved:
        node.inputs[role] = resolved["stage"]


def _train_node(builder: _Builder, index: int, stage: TrainStage) -> Node:
    spec, path = builder.spec, ("stages", index)
    config: dict[str, Any] = {"stage": _stage_config(stage), "seed": spec.seed,
                              "tokenizer": spec.tokenizer}
    ref = student_ref(spec, index)
    if ref is None:
        builder.error((*path, "student"), "the first training stage needs a `student`",
                      "name a model from `models`")
    config["student"] = builder.model((*path, "student"), ref) if ref else None
    config["data"] = builder.data((*path, "data"), stage.data)
    if isinstance(stage, TeacherStage) or (isinstance(stage, StepByStepStage) and stage.teacher):
        config["teacher"] = builder.model((*path, "teacher"), stage.teacher)
    if isinstance(stage, MiniLLMStage) and stage.pretrain_data:
        config["pretrain_data"] = builder.data((*path, "pretrain_data"), stage.pretrain_data)
    node = Node(stage.name, "train", stage.name, stage.kind, config)
    _model_inputs(node, "student", config["student"])
    _model_inputs(node, "teacher", config.get("teacher"))
    return node


def _teacher_logits_node(builder: _Builder, train: Node, stage: PretrainKDStage) -> Node:
    config = {key: train.config[key] for key in ("teacher", "data", "tokenizer", "seed")}
    config.update(cache=stage.teacher_cache.model_dump(mode="json"), seq_len=stage.seq_len,
                  tokens=stage.total_steps * stage.tokens_per_step,
                  temperature=stage.loss.temperature)
    node = Node(f"{stage.name}.teacher_logits", "teacher_logits", stage.name, stage.kind, config)
    _model_inputs(node, "teacher", config["teacher"])
    return _add(builder, node)


def _rationales_node(builder: _Builder, train: Node, stage: StepByStepStage) -> Node:
    config = {"teacher": train.config.get("teacher"), "data": train.config["data"],
              "rationales": stage.rationales.model_dump(mode="json"),
              "tokenizer": train.config["tokenizer"], "seed": train.config["seed"]}
    # Two stages asking the same teacher the same questions share one node (and one bill).
    for node in builder.nodes.values():
        if node.kind == "rationales" and canonical_json(node.config) == canonical_json(config):
            return node
    node = Node(f"{stage.name}.rationales", "rationales", stage.name, stage.kind, config)
    _model_inputs(node, "teacher", config["teacher"])
    return _add(builder, node)


def _check_on_policy_cache(builder: _Builder, index: int, stage: Any) -> None:
    if stage.kind in ("minillm", "gkd") and stage.teacher_cache.mode != "online":
        builder.error(
            ("stages", index, "teacher_cache", "mode"),
            f"a `{stage.teacher_cache.mode}` teacher cache cannot feed the on-policy stage "
            f"`{stage.name}`: it scores the student's own samples, which no cache holds",
            "use mode: online",
        )


def _add_train_stage(builder: _Builder, index: int, stage: TrainStage) -> None:
    train = _train_node(builder, index, stage)
    _check_on_policy_cache(builder, index, stage)
    if isinstance(stage, PretrainKDStage) and stage.teacher_cache.mode != "online":
        train.inputs["teacher_logits"] = _teacher_logits_node(builder, train, stage).id
    if isinstance(stage, StepByStepStage):
        train.inputs["rationales"] = _rationales_node(builder, train, stage).id
    if isinstance(stage, SFTStage) and stage.labels_from:
        _link_labels_from(builder, index, stage, train)
    _add(builder, train)


def _link_labels_from(builder: _Builder, index: int, stage: SFTStage, train: Node) -> None:
    source = next((s for s in builder.spec.stages if s.name == stage.labels_from), None)
    if not isinstance(source, StepByStepStage):
        what = "no stage" if source is None else f"a `{source.kind}` stage"
        builder.error(("stages", index, "labels_from"),
                      f"`{stage.labels_from}` is {what}; teacher labels come only from a "
                      "step_by_step stage's rationales")
        return
    # The source's own rationales node may be shared with (and named after) an earlier stage.
    source_train = builder.nodes.get(source.name)
    if source_train is None:
        builder.error(("stages", index, "labels_from"),
                      f"`{stage.labels_from}` must come before `{stage.name}`")
        return
    train.inputs["rationales"] = source_train.inputs["rationales"]


def _add_eval_stage(builder: _Builder, index: int, stage: EvalStage) -> None:
    path = ("stages", index)
    models = {}
    for i, ref in enumerate(stage.models):
        models[ref] = builder.model((*path, "models", i), ref)
    datas = {name: builder.data((*path, "data", i), name) for i, name in enumerate(stage.data)}
    config = {"stage": _stage_config(stage), "models": models, "data": datas,
              "tokenizer": builder.spec.tokenizer, "seed": builder.spec.seed}
    node = Node(stage.name, "eval", stage.name, stage.kind, config)
    for ref, resolved in models.items():
        _model_inputs(node, f"model:{ref}", resolved)
    _add(builder, node)


def _check_names(builder: _Builder) -> None:
    seen: dict[str, int] = {}
    for index, stage in enumerate(builder.spec.stages):
        if stage.name in seen:
            builder.error(("stages", index, "name"),
                          f"stage name `{stage.name}` is used twice "
                          f"(first at stages[{seen[stage.name]}])")
        seen.setdefault(stage.name, index)
        if stage.name in builder.spec.models:
            builder.error(("stages", index, "name"),
                          f"`{stage.name}` names both a model and a stage; references would be "
                          "ambiguous", "rename one of them")


def _check_after(builder: _Builder) -> None:
    names = [s.name for s in builder.spec.stages]
    for index, stage in enumerate(builder.spec.stages):
        for i, dep in enumerate(stage.after):
            if dep not in names:
                builder.error(("stages", index, "after", i), f"no stage named `{dep}`",
                              did_you_mean(dep, names))
            elif dep in builder.nodes:
                builder.nodes[stage.name].depends_on.append(dep)


def _wire_dependencies(builder: _Builder) -> None:
    for node in builder.nodes.values():
        for dep in node.inputs.values():
            if dep not in node.depends_on:
                node.depends_on.append(dep)


def build_plan(spec: Spec, *, base_dir: Path | None = None, locate: Any = None,
               estimate: bool = True) -> Plan:
    """Resolve `spec` into a Plan. Problems are collected in `plan.diagnostics` (with locations
    when `locate` maps key paths to file positions); nothing is raised for a bad spec."""
    builder = _Builder(spec, base_dir or Path("."), locate or (lambda _path: None))
    _check_names(builder)
    for index, stage in enumerate(spec.stages):
        if stage.name in builder.nodes:
            continue  # a duplicate name, already reported
        if isinstance(stage, TrainStage):
            _add_train_stage(builder, index, stage)
        else:
            _add_eval_stage(builder, index, stage)
    _check_after(builder)
    _wire_dependencies(builder)
    report = Node("report", "report", None, None, {"name": spec.name})
    report.depends_on = [n.id for n in builder.nodes.values() if n.kind in ("train", "eval")]
    _add(builder, report)
    plan = Plan(spec.name, [], builder.diagnostics)
    ordered, cycle = topological_order(builder.nodes)
    if cycle:
        _report_cycle(builder, cycle)
        ordered = list(builder.nodes.values())
    plan.nodes = ordered
    if not cycle:
        _fingerprint(plan)
    from .checks import check_plan

    check_plan(plan, spec, builder)
    if estimate and not plan.errors:
        from .estimates import estimate_plan

        estimate_plan(plan, spec, builder)
    return plan


def _report_cycle(builder: _Builder, cycle: list[str]) -> None:
    stages = [n for n in cycle if n in builder.nodes and builder.nodes[n].stage]
    first = next((i for i, s in enumerate(builder.spec.stages) if s.name in stages), 0)
    builder.error(("stages", first), "stages depend on each other in a cycle: "
                  + " -> ".join([*cycle, cycle[0]]))


def _fingerprint(plan: Plan) -> None:
    prints: dict[str, str] = {}
    for node in plan.nodes:
        inputs = {dep: prints[dep] for dep in node.depends_on}
        node.fingerprint = prints[node.id] = fingerprint(node.kind, node.config, inputs)
