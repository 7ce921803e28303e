"""Distill / train tab: launch a training script, watch it (status, loss curve, samples, log),
cancel, resume, and put the result into the studio at once ("use this model").

All process handling is :class:`pipelines.run_manager.RunManager`'s; this module only draws it.
Training is off on Hugging Face Spaces and with ``--no-train``: the tab then says so.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from pipelines.run_manager import METHODS, RunError, RunManager, _config_class
from studio.registry import ASSETS_DIR, ModelRegistry, add_local

__all__ = ["build", "key_fields", "format_eta", "UseTarget"]

COLUMNS = ["run", "method", "state", "step", "progress", "ETA", "steps/s"]


def key_fields(method: str) -> dict[str, Any]:
    """The method's key hyperparameters and their defaults: the step budget, batch, learning rate(s)."""
    spec = METHODS[method]
    fields = {f.name: f.default for f in dataclasses.fields(_config_class(spec))}
    out = {spec.steps_field: fields[spec.steps_field]}
    for name in ("batch", "batch_size", "lr", "lr_g", "lr_d", "lr_generator", "lr_fake"):
        if name in fields:
            out[name] = fields[name]
    return out


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _default_base(method: str) -> str:
    spec = METHODS[method]
    if spec.base_may_be_hub_id:   # a hub teacher: the script's own default id
        return str(next(f.default for f in dataclasses.fields(_config_class(spec)) if f.name == spec.base_field))
    # the embedded model each kind of base defaults to (a teacher only once one is embedded)
    folder = {"generator": ASSETS_DIR / "stylegan2_portraits64", "teacher": ASSETS_DIR / "portrait_teacher",
              "source": ASSETS_DIR / "portrait_teacher"}.get(
        spec.base_field or "")
    return str(folder) if folder is not None and folder.exists() else ""


@dataclasses.dataclass(frozen=True)
class UseTarget:
    """A model dropdown of another tab that "use this model" refreshes: its choices are the
    registry's models of ``kind`` (filtered by ``choices`` when given), and it selects the new
    model when the run's method produces one of ``selects``."""

    kind: str
    dropdown: Any
    selects: tuple[str, ...] = ()
    choices: Callable[[ModelRegistry], list[str]] | None = None

    def update(self, registry: ModelRegistry, name: str, kind: str, produced: str) -> Any:
        if kind != self.kind:
            return gr.update()
        names = self.choices(registry) if self.choices else registry.names(self.kind)
        if produced in self.selects and name in names:
            return gr.update(choices=names, value=name)
        return gr.update(choices=names)


def build(registry: ModelRegistry, demo: gr.Blocks, *, runs_dir: str, enabled: bool = True, reason: str = "",
          targets: Sequence[UseTarget] = ()) -> dict[str, Any]:
    """Add the tab. ``targets``: the other tabs' model dropdowns that "use this model" refreshes."""
    with gr.Tab("Distill / train", id="train"):
        if not enabled:
            gr.Markdown(f"### Training is off here\n{reason} Run the studio on your own machine "
                        "(`./studio.sh run`) to launch, watch and resume training runs; the models you "
                        "train there load here like any local folder.", elem_id="train_off")
            return {}
        manager = RunManager(runs_dir)
        first = "stylegan_encoder" if "stylegan_encoder" in METHODS else next(iter(METHODS))
        gr.Markdown("Launch one of the studio's training scripts as its own (niced) process. Runs live in "
                    f"`{runs_dir}/`: they survive a restart of the studio, resume from their last checkpoint, "
                    "and a finished one joins the studio with **Use this model**.")
        with gr.Row():
            with gr.Column(scale=1):
                method = gr.Dropdown([(s.label, k) for k, s in METHODS.items()], value=first, label="Method",
                                     elem_id="train_method")
                base = gr.Textbox(_default_base(first),
                                  label="Teacher / base model (a folder, an earlier run's, or a hub id)",
                                  elem_id="train_base", visible=METHODS[first].base_field is not None)
                preset = gr.Radio(list(METHODS[first].presets), value="quick demo", label="Preset",
                                  elem_id="train_preset")
                settings = gr.Code(json.dumps(key_fields(first), indent=1), language="json",
                                   label="Settings (JSON; empty = the preset's)", elem_id="train_settings")
                name = gr.Textbox("", label="Run name (empty = method + time)", elem_id="train_name")
                with gr.Row():
                    estimate = gr.Button("Estimate time and memory", elem_id="train_estimate")
                    launch = gr.Button("Launch", variant="primary", elem_id="train_launch")
                message = gr.Markdown("", elem_id="train_message")
            with gr.Column(scale=2):
                table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, label="Runs",
                                     elem_id="train_runs")
                run = gr.Dropdown([], label="Run", elem_id="train_run")
                with gr.Row():
                    curve = gr.LinePlot(x="step", y="value", color="series", label="Loss curves", height=240)
                    sample = gr.Image(label="Latest samples", type="filepath", interactive=False, height=240)
                log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, interactive=False)
                with gr.Row():
                    cancel = gr.Button("Cancel")
                    resume = gr.Button("Resume")
                    use = gr.Button("Use this model", variant="primary", elem_id="train_use")
        timer = gr.Timer(2.0)

        def on_method(key: str):
            spec = METHODS[key]
            return (gr.update(visible=spec.base_field is not None, value=_default_base(key)),
                    gr.update(choices=list(spec.presets), value="quick demo" if "quick demo" in spec.presets else None),
                    json.dumps(key_fields(key) if not spec.presets else spec.presets.get("quick demo", {}), indent=1))

        def on_preset(key: str, preset_name: str):
            values = dict(METHODS[key].presets.get(preset_name, {}))
            shown = {k: values.get(k, v) for k, v in key_fields(key).items()}
            return json.dumps(shown, indent=1)

        def read_params(key: str, base_path: str, text: str) -> dict[str, Any]:
            try:
                params = json.loads(text) if text and text.strip() else {}
            except json.JSONDecodeError as exc:
                raise gr.Error(f"the settings are not valid JSON: {exc}") from None
            if not isinstance(params, dict):
                raise gr.Error("the settings must be a JSON object, e.g. {\"steps\": 200}")
            spec = METHODS[key]
            if spec.base_field and base_path.strip():
                params[spec.base_field] = base_path.strip()
            return params

        def on_estimate(key: str, base_path: str, preset_name: str, text: str):
            params = read_params(key, base_path, text)
            try:
                est = manager.estimate(key, params, preset=preset_name or None)
            except RunError as exc:
                raise gr.Error(str(exc)) from None
            return f"⏱️ {METHODS[key].label}: {est.summary()}"

        def on_launch(key: str, base_path: str, preset_name: str, text: str, run_name: str):
            params = read_params(key, base_path, text)
            try:
                started = manager.launch(key, params, preset=preset_name or None, name=run_name.strip() or None)
            except RunError as exc:
                raise gr.Error(str(exc)) from None
            state = manager.info(started).state
            return f"**{started}**: {state}", gr.update(choices=manager.names(), value=started)

        def refresh(selected: str | None):
            manager.poll()
            infos = manager.runs()
            rows = [[i.name, METHODS[i.method].label if i.method in METHODS else i.method, i.state,
                     f"{i.step}/{i.total}", f"{100 * i.progress:.0f}%", format_eta(i.eta_s),
                     f"{i.throughput:.2f}" if i.throughput else ""] for i in infos]
            names = [i.name for i in infos]
            selected = selected if selected in names else (names[0] if names else None)
            points, image, text = [], None, ""
            if selected:
                info = next(i for i in infos if i.name == selected)
                for row in info.metrics:
                    for k, v in row.items():
                        if k.startswith("loss") and isinstance(v, (int, float)):
                            points.append({"step": row["step"], "value": v, "series": k})
                image, text = info.latest_sample, info.log_tail
                if info.state == "failed" and info.error:
                    text = f"FAILED: {info.error}\n{text}"
            import pandas as pd
            return (rows, gr.update(choices=names, value=selected),
                    pd.DataFrame(points or {"step": [], "value": [], "series": []}), image, text)

        def run_action(action, done: str):
            """A button handler calling ``action(run name)`` with the run chosen in the list."""
            def handler(selected: str | None):
                if not selected:
                    raise gr.Error("choose a run first")
                try:
                    action(selected)
                except RunError as exc:
                    raise gr.Error(str(exc)) from None
                return f"**{selected}** {done}"
            return handler

        on_cancel = run_action(manager.cancel, "cancelled (its last checkpoint is kept; Resume continues it)")
        on_resume = run_action(manager.resume, "resumed from its last checkpoint")

        def on_use(selected: str | None):
            if not selected:
                raise gr.Error("choose a run first")
            try:
                folder = manager.servable(selected)
                spec = add_local(registry, folder, name=f"{selected} (run)", source="run")
            except RunError as exc:
                raise gr.Error(str(exc)) from None
            except ValueError as exc:
                raise gr.Error(f"{selected}'s result cannot be served: {exc}") from None
            produced = METHODS[manager.info(selected).method].produces
            updates = [t.update(registry, spec.name, spec.kind, produced) for t in targets]
            where = f"the studio's {spec.kind} choices"
            if produced != spec.kind:
                where += f" (its base generator with the new {produced.replace('_', ' ')})"
            return [f"**{spec.name}** is now in {where}", *updates]

        method.change(on_method, method, [base, preset, settings], api_name=False)
        preset.change(on_preset, [method, preset], settings, api_name=False)
        estimate.click(on_estimate, [method, base, preset, settings], message, api_name="train_estimate")
        launch.click(on_launch, [method, base, preset, settings, name], [message, run], api_name="train_launch")
        timer.tick(refresh, run, [table, run, curve, sample, log], api_name=False, show_progress="hidden")
        run.change(refresh, run, [table, run, curve, sample, log], api_name=False, show_progress="hidden")
        cancel.click(on_cancel, run, message, api_name=False)
        resume.click(on_resume, run, message, api_name=False)
        use.click(on_use, run, [message, *[t.dropdown for t in targets]], api_name=False)
    return {"manager": manager}
