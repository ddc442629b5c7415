"""The card's framing sections: title and banners, the introduction, the model facts (config.json), Reproduce and
Sources."""

from __future__ import annotations

import os
import shlex

from mobilevit_npu import models
from mobilevit_npu.card_text import Section, bullets, code, num, row, shown_list
from mobilevit_npu.cardfacts import command, short_commit, shown_path

# config.json fields with a word of their own in the templates (the others are shown as their field name)
CARD_KEY_WORDS = {
    "hidden_sizes": "model_hidden_sizes",
    "neck_hidden_sizes": "model_neck_hidden_sizes",
    "num_attention_heads": "model_heads",
    "patch_size": "model_patch_size",
    "hidden_act": "model_activation",
}


class IntroSection(Section):
    """The title, the warnings at the top and the introduction."""

    def title(self) -> str:
        key = "title_port" if self.f.port_result else ("title_synthetic" if self.f.synthetic else "title_stack")
        return self.w(key, platforms=self.platforms(), model=self.model_name())

    def banners(self) -> str:
        """Warnings at the top, in the card's language: synthetic weights, a CPU-only measurement."""
        out = []
        if self.f.synthetic:
            out.append(self.t.fill("synthetic_banner", seed=self.f.ident[1]))
        if set(self.f.platforms) == {"cpu"}:
            out.append(self.t.fill("cpu_banner", platforms=self.platforms()))
        return "\n\n".join(out)

    def model_name(self) -> str:
        """MobileViT-X-Small for its checkpoint's architecture (the published figures' model), else the family."""
        return "MobileViT-X-Small" if self.f.model.published is not None else self.f.model.family.title

    def intro(self) -> str:
        from mobilevit_npu import onnx_export

        m = self.f.model
        what = self.w("what_port" if self.f.port_result else "what_stack", platforms=self.platforms())
        if m.published is None:  # published figures only for the checkpoint they are known and cited for
            return self.t.fill(
                "intro_family",
                model=m.family.title,
                architecture=(m.config.get("architectures") or ["?"])[0],
                parameters=num(m.parameters, ","),
                parameters_m=f"{m.parameters / 1e6:.2f}",
                height=onnx_export.pixel_map(m.preprocess).height,
                width=onnx_export.pixel_map(m.preprocess).width,
                labels=len(m.config["id2label"]),
                origin=self.origin(),
                measured=self.measured(),
                what=what,
            )
        return self.t.fill(
            "intro",
            origin=self.origin(),
            parameters=num(m.parameters, ","),
            parameters_m=f"{m.parameters / 1e6:.2f}",
            height=m.preprocess.crop_height,
            width=m.preprocess.crop_width,
            labels=len(m.config["id2label"]),
            published_top1=m.published.top1,
            published_params=m.published.params,
            measured=self.measured(),
            what=what,
        )

    def origin(self) -> str:
        """Which weights were measured, as the reports record it: a hub checkpoint only where a report says so."""
        o, published = self.f.origin, self.f.model.published
        if o.kind == "synthetic":
            return self.w("origin_synthetic", seed=o.seed)
        if o.kind == "hub":
            revision = self.w("origin_revision", revision=code(o.revision)) if o.revision else ""
            return self.w("origin_hub", hub_id=o.hub_id, revision=revision)
        local = self.w("origin_local", file=code(f"{shown_path(o.folder or '.')}/{o.file}"), sha256=code(o.sha256[:16]))
        if published is not None:  # the architecture is the checkpoint's; the bytes are not known to be
            local += self.w("origin_local_not_hub", checkpoint=published.checkpoint)
        return local

    def measured(self) -> str:
        """What the reports measured against labels: the card's own labelled top-1, or no accuracy at all."""
        labelled = [s for s in self.f.accuracy if s.kind == "labelled" and s.report.dataset is not None]
        if not labelled:
            return self.w("measured_none")
        return self.w("measured_labelled", reports=self.w("list_sep").join(self.report_ref(s) for s in labelled))


class ModelSection(Section):
    """The model facts, read from config.json and preprocessor_config.json."""

    def model(self) -> str:
        m, cfg, pre = self.f.model, self.f.model.config, self.f.model.preprocess

        from mobilevit_npu import onnx_export

        architecture = (cfg.get("architectures") or [f"{m.family.title}ForImageClassification"])[0]
        pixels = onnx_export.pixel_map(pre)
        if all(o == 0 for o in pixels.offset) and all(abs(k - 1 / 255) < 1e-9 for k in pixels.scale):
            preprocess = self.w("preprocess_bgr") if pixels.swap else self.w("preprocess_rgb")
        else:  # mean/std, or another scale: the arithmetic as AIPP states it, (pixel - min) x scale per channel
            mins = shown_list([round(-o / k, 4) for o, k in zip(pixels.offset, pixels.scale)])
            scales = shown_list([float(f"{k:.6g}") for k in pixels.scale])
            preprocess = self.w("preprocess_affine", order="BGR" if pixels.swap else "RGB", mins=mins, scales=scales)
        edge = getattr(pre, "shortest_edge", None)
        if isinstance(edge, int) and getattr(pre, "do_center_crop", False):
            size = self.w("input_size", height=pixels.height, width=pixels.width, edge=edge)
        else:
            size = self.w("input_size_fixed", height=pixels.height, width=pixels.width)
        rows = [row(self.w("field"), self.w("value")), row("---", "---")]
        rows += [
            row(self.w("model_architecture"), code(architecture)),
            row(self.w("model_parameters"), num(m.parameters, ",")),
            row(self.w("model_input"), size),
            row(self.w("model_preprocess"), preprocess),
        ]
        for key in m.family.card_keys:  # the family's shape fields; a generic family's only where config.json has them
            if key not in cfg:  # a known family's are there: cardfacts.refuse_untellable
                continue
            value = cfg[key]
            label = self.w(CARD_KEY_WORDS[key]) if key in CARD_KEY_WORDS else code(key)
            shown = code(shown_list(value)) if isinstance(value, list) else value
            shown = code(value) if isinstance(value, str) else shown
            rows.append(row(label, shown))
        rows.append(row(self.w("model_labels"), len(cfg["id2label"])))
        return self.t.fill("model", table="\n".join(rows), folder=shown_path(str(m.folder)))


class ReproduceSection(Section):
    """How to make this card again, and the reports it was made from."""

    def reproduce(self) -> str:
        first = self.f.sources[0].report.provenance
        commit = first.commit
        git = commit not in ("not a git checkout", "git unavailable")
        packages = self.w("list_sep").join(code(f"{n} {v}") for n, v in first.packages.items() if v)
        steps = [self.w("step_install")]
        if git:
            steps.insert(0, self.w("step_checkout", commit=commit.removesuffix("+dirty")))
        steps += self.weights_steps()
        steps += [command(s) for s in self.f.sources]
        steps.append(self.regenerate())
        shown_commit = self.w("commit_git", commit=code(commit)) if git else self.w("commit_none")
        if git and commit.endswith("+dirty"):
            shown_commit += self.w("commit_dirty")
        text = self.t.fill(
            "reproduce",
            commit=shown_commit,
            packages_sha256=first.packages_sha256,
            packages=packages,
            steps="\n".join(steps),
        )
        return text + self.differ()

    def weights_steps(self) -> list[str]:
        """How to get the very weights measured: the hub checkpoint (at its commit) only where a report says the
        weights came from there; otherwise the local file, named with the sha256 a copy must have."""
        o = self.f.origin
        if o.kind == "synthetic":
            return [self.w("step_weights_synthetic", seed=o.seed)]
        folder = shown_path(o.folder or ".")
        check = self.w("step_weights_check", file=f"{folder}/{o.file}", sha256=o.sha256)
        if o.kind == "local":
            return [self.w("step_weights_local", file=f"{folder}/{o.file}"), check]
        if o.folder and models.hub_snapshot(o.folder):  # the runs named the hub id: their commands fetch it themselves
            return [self.w("step_weights_hub_cache", hub_id=o.hub_id, revision=o.revision or "?", sha256=o.sha256)]
        download = models.download_command(o.hub_id, folder)
        return [download + (f" --revision {o.revision}" if o.revision else ""), check]

    def regenerate(self) -> str:
        """This card's own command: port_report.py's arguments as given (the reports, --output, --lang ...), or, for
        a card built without them, the reports and the default output."""
        argv = self.f.card_argv
        if argv is None:
            return self.w("step_regenerate", reports=" ".join(shown_path(s.path) for s in self.f.sources))
        return "python " + shlex.join(["port_report.py", *(shown_path(a) if os.path.isabs(a) else a for a in argv)])

    def differ(self) -> str:
        """The reports' commits and package sets, listed when they are not all one (a commit's +dirty mark kept)."""
        made = [(s.report.provenance.commit, s.report.provenance.packages_sha256) for s in self.f.sources]
        if len(set(made)) == 1:
            return ""
        listed = self.w("list_sep").join(
            f"{code(s.name)} {code(short_commit(commit))} {code(packages[:12])}"
            for s, (commit, packages) in zip(self.f.sources, made)
        )
        return "\n\n" + self.w("commits_differ", list=listed)

    def sources(self) -> str:
        """The Sources section: every report, its sha256 and the command that wrote it."""
        return bullets(
            [
                self.w("source_line", report=self.report_ref(s), sha256=code(s.digest[:16]), command=code(command(s)))
                for s in self.f.sources
            ]
        )
