"""The RoMA study (DESIGN.md §5): ``moealign roma --base RUN_DIR --config configs/roma.toml``,
or on a transformers MoE model ``moealign roma --hf-model PATH --questions FILE.jsonl
--heldout-tasks TASK ...`` (:meth:`RomaStudy.from_hf_model`, :mod:`moealign.roma.questions`).

From a model pretrained with ``moealign train`` on the multi-task suite, the study evaluates on
the seen tasks' test split ("seen") and on the held-out tasks and compositions ("heldout"), all
in multiple-choice form:

* ``base``: the pretrained model;
* ``router_tuning``: routers of the chosen layers trained with the CE only (λ = 0);
* ``roma``: the same with the configured regulariser (``manifold`` = RoMA);
* ``c3po``: test-time kernel-regression re-mixing towards the successful training neighbours,
  with its extra inference time measured;
* ``oracle``: per-question routing optimised with the label (the upper bound).

Questions are the suite's multiple-choice view (:func:`multiple_choice_questions`), in the
form the base model was trained on (``data.format``): lettered options in the prompt, or the
plain prompt with the options scored as continuations (cloze form, ``continuation="text"``).

Per seed, the training examples (``train_examples_per_task`` per seen task) are drawn afresh;
the base model's routing on them gives the targets r_j and the successful set S, which also
serves as C3PO's reference set. ``base`` and ``oracle`` do not depend on the seed. Results go
to ``OUT/results.json`` (per method × seed × set: per-task accuracy and per-example
correctness in :meth:`TaskEvaluation.to_dict` form; summaries: accuracy mean ± 95% t half
width over seeds, oracle-gap closure (A_m − A_base)/(A_oracle − A_base), CTGI on the held-out
tasks with a paired bootstrap interval, the RoMA − router-tuning paired t-test, C3PO's cost)
and ``OUT/results.md`` (the tables).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moealign.config import ConfigError, RunConfig, build_config
from moealign.data import TaskExample, multiple_choice_view
from moealign.data.build import build_data_suite, build_data_tokenizer
from moealign.data.tokenizer import Tokenizer, load_transformers_tokenizer
from moealign.evaluation.ctgi import ctgi, normalized_gain
from moealign.evaluation.stats import mean_confidence_interval, paired_t_test
from moealign.evaluation.tasks import TaskEvaluation
from moealign.nn.routed import MoealignRouted, RoutedModel
from moealign.nn.transformer import MoETransformer
from moealign.roma.baselines import c3po_capture, oracle_capture
from moealign.roma.choices import Capture, capture, task_evaluation
from moealign.roma.config import RomaConfig
from moealign.roma.encoders import TextEncoder, build_encoder
from moealign.roma.neighbours import find_neighbours
from moealign.roma.questions import load_questions, split_questions
from moealign.roma.training import RouterTrainingConfig, train_routers
from moealign.tables import Table, to_markdown
from moealign.training.checkpoint import CheckpointError, load_latest

log = logging.getLogger(__name__)

METHODS = ("base", "router_tuning", "roma", "c3po", "oracle")
SETS = ("seen", "heldout")
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "got 'cuda' but no CUDA device is available")
    return torch.device(name)


def load_base_model(run_dir: Path, device: torch.device) -> tuple[RunConfig, MoETransformer]:
    """The run's config and its newest checkpoint's model (on ``device``)."""
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError("base", f"got {str(run_dir)!r}, which holds no run (no config.json)")
    run_config = build_config(RunConfig, json.loads(config_file.read_text()))
    checkpoint = load_latest(run_dir / "checkpoints")
    if checkpoint is None:
        raise CheckpointError(f"run directory {run_dir} has no checkpoint to load")
    model = MoETransformer(run_config.model)
    checkpoint.load_model(model)
    return run_config, model.to(device)


def multiple_choice_questions(
    examples: Sequence[TaskExample], form: str, n_options: int, seed: int
) -> list[TaskExample]:
    """The multiple-choice view of ``examples`` (options, gold letter) in the form the base
    model was trained on: ``"multiple_choice"`` keeps the lettered prompt; ``"plain"`` keeps
    the plain prompt (cloze form: the options are scored as continuations, not listed)."""
    questions = multiple_choice_view(examples, n_options, seed=seed)
    if form == "plain":
        return [replace(q, prompt=e.prompt) for q, e in zip(questions, examples, strict=True)]
    return questions


def _first_per_task(examples: Sequence[TaskExample], count: int) -> list[TaskExample]:
    taken: dict[str, int] = {}
    out = []
    for example in examples:
        if taken.get(example.task, 0) < count:
            taken[example.task] = taken.get(example.task, 0) + 1
            out.append(example)
    return out


def _sample_per_task(examples: Sequence[TaskExample], count: int, seed: int) -> list[TaskExample]:
    generator = torch.Generator().manual_seed(seed)
    by_task: dict[str, list[TaskExample]] = {}
    for example in examples:
        by_task.setdefault(example.task, []).append(example)
    out = []
    for task in sorted(by_task):
        pool = by_task[task]
        order = torch.randperm(len(pool), generator=generator)[:count].sort().values
        out += [pool[i] for i in order.tolist()]
    return out


def _evaluation(examples: Sequence[TaskExample], result: Capture) -> TaskEvaluation:
    return task_evaluation(examples, result.prediction_N)


class RomaStudy:
    """The study's fixed parts (routed model, tokenizer, questions, encoder, base and oracle
    results); :meth:`run` adds the per-seed methods and writes the results. Build it from a
    ``moealign train`` run (:meth:`from_run`) or from a transformers MoE model and a questions
    file (:meth:`from_hf_model`).

    ``train_pool``: multiple-choice training questions (per seed ``train_examples_per_task``
    per task are drawn); ``eval_sets``: ``seen`` and ``heldout`` questions; ``source`` names
    the model in the results (``base_run``). Only the routers of the chosen layers train, and
    they are restored from a copy after each training.
    """

    def __init__(
        self,
        routed: RoutedModel,
        tokenizer: Tokenizer,
        train_pool: list[TaskExample],
        eval_sets: dict[str, list[TaskExample]],
        config: RomaConfig,
        encoder: TextEncoder | None = None,
        source: str = "",
    ):
        self.config = config
        self.device = _device(config.device)
        self.routed = routed
        self.tokenizer = tokenizer
        self.train_pool = train_pool
        self.eval_sets = eval_sets
        self.source = source
        self.layers = config.layer_indices(routed.n_moe_layers())
        self.base_routers = [p.detach().clone() for p in routed.router_parameters(self.layers)]
        self.encoder = (
            encoder if encoder is not None else build_encoder(config.encoder, self.device)
        )

    @classmethod
    def from_run(
        cls, base_run: str | Path, config: RomaConfig, encoder: TextEncoder | None = None
    ) -> RomaStudy:
        """The study on a ``moealign train`` run's newest checkpoint and its task suite: the
        training split of the seen tasks, their test split ("seen") and the held-out tasks and
        compositions ("heldout"), in multiple-choice form."""
        run_config, model = load_base_model(Path(base_run), _device(config.device))
        data = run_config.data
        if data.source not in ("tasks", "mixed"):
            raise ConfigError(
                "base",
                f"the base run trained on data.source={data.source!r}; RoMA needs the "
                "task suite ('tasks' or 'mixed')",
            )
        suite = build_data_suite(data)

        def view(examples: list[TaskExample]) -> list[TaskExample]:
            return multiple_choice_questions(examples, data.format, data.n_options, data.seed)

        heldout = suite.heldout_tasks + suite.heldout_compositions
        if not heldout:
            raise ConfigError("base", "the base run's task suite holds no task out")
        per_task = config.eval_examples_per_task
        eval_sets = {
            "seen": _first_per_task(view(suite.test), per_task),
            "heldout": _first_per_task(view(heldout), per_task),
        }
        tokenizer = build_data_tokenizer(data)
        return cls(
            MoealignRouted(model), tokenizer, view(suite.train), eval_sets, config, encoder,
            source=str(base_run),
        )  # fmt: skip

    @classmethod
    def from_hf_model(
        cls,
        model_path: str,
        questions_path: str | Path,
        heldout_tasks: Sequence[str],
        config: RomaConfig,
        encoder: TextEncoder | None = None,
    ) -> RomaStudy:
        """The study on a transformers MoE causal LM (a local directory or hub name, with its
        tokenizer; :class:`~moealign.integrations.hf.HFRouted`) and the multiple-choice
        questions of a JSONL file (:mod:`moealign.roma.questions`): the tasks
        ``heldout_tasks`` form the "heldout" set, the other tasks' questions are split into
        the training pool and the "seen" test set."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from moealign.integrations.hf import HFRouted, detect_family

        try:  # the questions first: every input is checked before the weights load
            questions = load_questions(questions_path)
        except ValueError as err:
            raise ConfigError("--questions", str(err)) from None
        try:
            pool, test, heldout = split_questions(questions, heldout_tasks)
        except ValueError as err:  # the message names --heldout-tasks or the question count
            raise ConfigError("", str(err)) from None
        try:
            detect_family(AutoConfig.from_pretrained(model_path))
            tokenizer = load_transformers_tokenizer(model_path)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            routed = HFRouted(model.to(_device(config.device)).eval())
        except (OSError, ValueError) as err:
            raise ConfigError("--hf-model", str(err).strip().splitlines()[0]) from None
        per_task = config.eval_examples_per_task
        eval_sets = {
            "seen": _first_per_task(test, per_task),
            "heldout": _first_per_task(heldout, per_task),
        }
        return cls(routed, tokenizer, pool, eval_sets, config, encoder, source=model_path)

    def _restore_routers(self) -> None:
        with torch.no_grad():
            for parameter, saved in zip(
                self.routed.router_parameters(self.layers), self.base_routers, strict=True
            ):
                parameter.copy_(saved)

    # ------------------------------------------------------------------ pieces

    def _capture(self, examples: Sequence[TaskExample]) -> Capture:
        c = self.config
        return capture(
            self.routed,
            self.tokenizer,
            examples,
            self.layers,
            c.token,
            c.continuation,
            c.eval_batch_size,
        )

    def _neighbours(self, query, reference, seed: int, query_ids=None, reference_ids=None):
        c = self.config
        return find_neighbours(
            query,
            reference,
            mode=c.neighbours,
            k=c.k,
            epsilon=c.epsilon,
            sigma=c.sigma,
            query_ids=query_ids,
            reference_ids=reference_ids,
            generator=torch.Generator().manual_seed(seed),
        )

    def _train(self, examples, regularizer: str, targets, neighbourhood, seed: int) -> dict:
        c = self.config
        self._restore_routers()
        training = RouterTrainingConfig(
            regularizer=regularizer,
            lambda_max=c.lambda_max,
            lambda_warmup_steps=c.lambda_warmup_steps,
            lr=c.lr,
            weight_decay=c.weight_decay,
            epochs=c.epochs,
            batch_size=c.batch_size,
        )
        history = train_routers(
            self.routed,
            self.tokenizer,
            examples,
            self.layers,
            training,
            token=c.token,
            continuation=c.continuation,
            targets_NP=targets,
            neighbourhood=neighbourhood,
            seed=seed,
        )
        evaluations = {name: self._capture(ex) for name, ex in self.eval_sets.items()}
        self._restore_routers()
        return {
            "evaluations": {n: _evaluation(self.eval_sets[n], r) for n, r in evaluations.items()},
            "history": {
                "ce_first": history.ce[0],
                "ce_last": history.ce[-1],
                "regularizer_first": history.regularizer[0],
                "regularizer_last": history.regularizer[-1],
                "steps": len(history.ce),
            },
        }

    # ------------------------------------------------------------------ the study

    def run(self, out_dir: str | Path) -> dict[str, Any]:
        c = self.config
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        methods = [m for m in METHODS if m == "base" or m in c.methods]
        per_seed: dict[str, dict[str, dict[str, TaskEvaluation]]] = {m: {} for m in methods}
        timings: dict[str, float] = {}
        fixed: dict[str, dict[str, TaskEvaluation]] = {m: {} for m in ("base", "oracle")}
        eval_embeddings = {}
        for name, examples in self.eval_sets.items():
            start = time.perf_counter()
            fixed["base"][name] = _evaluation(examples, self._capture(examples))
            timings[f"base_{name}_s"] = time.perf_counter() - start
            log.info("base %s: %.3f", name, fixed["base"][name].macro_accuracy)
            if "c3po" in methods:
                start = time.perf_counter()
                eval_embeddings[name] = self.encoder.encode([e.prompt for e in examples])
                timings[f"c3po_embed_{name}_s"] = time.perf_counter() - start
            if "oracle" not in methods:
                continue
            start = time.perf_counter()
            oracle = oracle_capture(
                self.routed,
                self.tokenizer,
                examples,
                self.layers,
                c.oracle_steps,
                c.oracle_lr,
                c.token,
                c.continuation,
                c.eval_batch_size,
            )
            fixed["oracle"][name] = _evaluation(examples, oracle)
            timings[f"oracle_{name}_s"] = time.perf_counter() - start
            log.info("oracle %s: %.3f", name, fixed["oracle"][name].macro_accuracy)
        seeds_info = {}
        for seed in c.seeds:
            key = str(seed)
            for method in ("base", "oracle"):
                if method in methods:
                    per_seed[method][key] = fixed[method]
            train = _sample_per_task(self.train_pool, c.train_examples_per_task, seed)
            targets = self._capture(train)
            success_S = targets.correct_N.nonzero().squeeze(-1)
            if success_S.numel() == 0:
                raise ValueError(
                    f"seed {seed}: the base model answers none of the {len(train)} training "
                    "questions; RoMA and C3PO need successful samples"
                )
            embeddings = self.encoder.encode([e.prompt for e in train])
            references_SP = targets.routing_NP[success_S]
            neighbourhood = self._neighbours(
                embeddings,
                embeddings[success_S],
                seed,
                query_ids=torch.arange(len(train)),
                reference_ids=success_S,
            )
            for name, examples in self.eval_sets.items() if "c3po" in methods else ():
                start = time.perf_counter()
                test_neighbours = self._neighbours(
                    eval_embeddings[name], embeddings[success_S], seed
                )
                remixed = c3po_capture(
                    self.routed,
                    self.tokenizer,
                    examples,
                    self.layers,
                    test_neighbours,
                    references_SP,
                    c.c3po_alpha,
                    c.token,
                    c.continuation,
                    c.eval_batch_size,
                )
                elapsed = time.perf_counter() - start + timings[f"c3po_embed_{name}_s"]
                timings.setdefault(f"c3po_{name}_s", []).append(elapsed)
                per_seed["c3po"].setdefault(key, {})[name] = _evaluation(examples, remixed)
            seeds_info[key] = {
                "train_examples": len(train),
                "successful": int(success_S.numel()),
                "mean_neighbours": float(neighbourhood.valid_QK.sum(-1).float().mean()),
            }
            trainings = {
                "router_tuning": ("none", None, None),
                "roma": (c.regularizer, references_SP, neighbourhood),
            }
            for method, (regularizer, targets_SP, pairs) in trainings.items():
                if method in methods:
                    trained = self._train(train, regularizer, targets_SP, pairs, seed)
                    per_seed[method][key] = trained["evaluations"]
                    seeds_info[key][method] = trained["history"]
            for method in methods:
                if method not in fixed:
                    accuracy = {
                        n: round(e.macro_accuracy, 3) for n, e in per_seed[method][key].items()
                    }
                    log.info("seed %d: %s %s", seed, method, accuracy)
        results = self._results(per_seed, timings, seeds_info)
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
        (out / TABLE_FILE).write_text(markdown_tables(results))
        return results

    def _results(self, per_seed, timings, seeds_info) -> dict[str, Any]:
        c = self.config
        return {
            "base_run": self.source,
            "config": asdict(c),
            "layers": self.layers,
            "tasks": {n: sorted({e.task for e in ex}) for n, ex in self.eval_sets.items()},
            "examples": {n: len(ex) for n, ex in self.eval_sets.items()},
            "methods": {
                method: {
                    seed: {name: evaluation.to_dict() for name, evaluation in sets.items()}
                    for seed, sets in seeds.items()
                }
                for method, seeds in per_seed.items()
            },
            "summary": summarise(per_seed, c.seeds),
            "c3po_cost": (
                c3po_cost(timings, {n: len(ex) for n, ex in self.eval_sets.items()})
                if "c3po" in per_seed
                else None
            ),
            "seeds": seeds_info,
        }


# Oracle-gap closure and CTGI need the oracle to beat the base model by at least this much
# (1 point of accuracy); below it the ratio is undefined or unstable and is reported as None.
MIN_HEADROOM = 0.01


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _gap_closure(accuracy: float, base: float, oracle: float) -> float | None:
    """(A_m − A_base)/(A_oracle − A_base); None when the headroom is under MIN_HEADROOM."""
    if oracle - base < MIN_HEADROOM:
        return None
    return float(normalized_gain(accuracy, base, oracle))


def _finite_or_none(value: float) -> float | None:
    """A bootstrap bound, or None where resamples left a task without headroom (0/0)."""
    return float(value) if np.isfinite(value) else None


def _ctgi_entry(method, base, oracle, seed: str) -> dict[str, Any]:
    try:
        estimate = ctgi(
            method["heldout"].correct_by_task(),
            base["heldout"].correct_by_task(),
            upper_bound=oracle["heldout"].correct_by_task(),
            min_headroom=MIN_HEADROOM,
            n_resamples=1000,
            seed=int(seed),
        )
    except ValueError as err:  # no held-out task with headroom
        return {"value": None, "ci_low": None, "ci_high": None, "reason": str(err)}
    return {
        "value": estimate.value,
        "ci_low": _finite_or_none(estimate.ci_low),
        "ci_high": _finite_or_none(estimate.ci_high),
        "per_task_gain": estimate.per_task_gain,
        "excluded_tasks": estimate.excluded_tasks,
    }


def summarise(
    per_seed: dict[str, dict[str, dict[str, TaskEvaluation]]], seeds: Sequence[int]
) -> dict[str, Any]:
    """Accuracy (mean ± 95% t half width over seeds, and per task), oracle-gap closure, CTGI on
    the held-out tasks (paired bootstrap, oracle per-example correctness as the upper bound),
    and the RoMA − router-tuning paired t-test over seeds. Gap closure and CTGI are None
    without the oracle in ``per_seed``; the t-test needs both RoMA and router tuning."""
    keys = [str(s) for s in seeds]
    has_oracle = "oracle" in per_seed
    summary: dict[str, Any] = {"accuracy": {}, "per_task": {}, "gap_closure": {}, "ctgi": {}}
    for method, by_seed in per_seed.items():
        summary["accuracy"][method] = {}
        summary["per_task"][method] = {}
        summary["gap_closure"][method] = {}
        for name in SETS:
            values = [by_seed[k][name].macro_accuracy for k in keys]
            mean, half_width, _ = mean_confidence_interval(values)
            summary["accuracy"][method][name] = {
                "per_seed": values,
                "mean": mean,
                "half_width": None if np.isnan(half_width) else half_width,
            }
            tasks = by_seed[keys[0]][name].tasks
            summary["per_task"][method][name] = {
                task: float(np.mean([by_seed[k][name].tasks[task].accuracy for k in keys]))
                for task in tasks
            }
            gaps = [
                _gap_closure(
                    by_seed[k][name].macro_accuracy,
                    per_seed["base"][k][name].macro_accuracy,
                    per_seed["oracle"][k][name].macro_accuracy,
                )
                if has_oracle
                else None
                for k in keys
            ]
            summary["gap_closure"][method][name] = {"per_seed": gaps, "mean": _mean(gaps)}
        estimates = [
            _ctgi_entry(by_seed[k], per_seed["base"][k], per_seed["oracle"][k], k)
            if has_oracle
            else {"value": None, "ci_low": None, "ci_high": None, "reason": "no oracle run"}
            for k in keys
        ]
        summary["ctgi"][method] = {
            "per_seed": estimates,
            "mean": _mean([e["value"] for e in estimates]),
        }
    if len(keys) >= 2 and {"roma", "router_tuning"} <= per_seed.keys():
        summary["roma_minus_router_tuning"] = {}
        for name in SETS:
            difference, half_width, p_value = paired_t_test(
                summary["accuracy"]["roma"][name]["per_seed"],
                summary["accuracy"]["router_tuning"][name]["per_seed"],
            )
            summary["roma_minus_router_tuning"][name] = {
                "mean_difference": difference,
                "half_width": None if np.isnan(half_width) else half_width,
                "p_value": None if np.isnan(p_value) else p_value,
            }
    return summary


def c3po_cost(timings: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    """C3PO's inference time (embedding the question, neighbour search, re-mixed forward)
    against the base model's plain evaluation of the same questions."""
    cost = {}
    for name, size in sizes.items():
        base = timings[f"base_{name}_s"]
        c3po = float(np.mean(timings[f"c3po_{name}_s"]))
        cost[name] = {
            "base_ms_per_example": 1000 * base / size,
            "c3po_ms_per_example": 1000 * c3po / size,
            "ratio": c3po / base,
        }
    return cost


def _cell(entry: dict[str, Any]) -> str:
    half = entry.get("half_width")
    return f"{100 * entry['mean']:.1f}" + (f" ± {100 * half:.1f}" if half is not None else "")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_tables(results: dict[str, Any]) -> str:
    """The main table (method × set accuracy, gap closure, CTGI) and the per-task table, for
    the methods the study ran."""
    summary = results["summary"]
    seeds = results["config"]["seeds"]
    methods = [m for m in METHODS if m in summary["accuracy"]]
    lines = [
        f"# RoMA study: {results['base_run']}",
        "",
        f"Accuracy (%) mean ± 95% t half width over seeds {list(seeds)}; gap closure ="
        " (A − A_base)/(A_oracle − A_base) on the macro accuracy; CTGI on the held-out tasks"
        " (oracle upper bound; mean over seeds of the value and of its 95% bootstrap bounds;"
        " n/a where bootstrap resamples left a task with no oracle headroom).",
        "",
    ]
    rows = []
    for method in methods:
        accuracy = summary["accuracy"][method]
        gaps = summary["gap_closure"][method]
        ctgi_entry = summary["ctgi"][method]
        bounds = [(e["ci_low"], e["ci_high"]) for e in ctgi_entry["per_seed"]]
        ctgi_cell = _number(ctgi_entry["mean"])
        if all(low is not None and high is not None for low, high in bounds):
            low, high = np.mean(bounds, axis=0)
            ctgi_cell += f" [{low:.3f}, {high:.3f}]"
        else:
            ctgi_cell += " [interval n/a]"
        rows.append(
            [
                method,
                _cell(accuracy["seen"]),
                _cell(accuracy["heldout"]),
                _number(gaps["seen"]["mean"]),
                _number(gaps["heldout"]["mean"]),
                ctgi_cell,
            ]
        )
    header = ["method", "seen", "held-out", "gap closure seen", "gap closure held-out"]
    lines.append(to_markdown(Table([*header, "CTGI held-out"], rows)))
    if "roma_minus_router_tuning" in summary:
        lines += ["", "RoMA − router tuning (paired t-test over seeds):", ""]
        for name, entry in summary["roma_minus_router_tuning"].items():
            half = entry["half_width"]
            lines.append(
                f"- {name}: {100 * entry['mean_difference']:+.2f} points"
                + (f" ± {100 * half:.2f}" if half is not None else "")
                + (f", p = {entry['p_value']:.3f}" if entry["p_value"] is not None else "")
            )
    cost = results["c3po_cost"] or {}
    if cost:
        lines += ["", "C3PO inference cost (ms per question, ratio to the base model):", ""]
    for name, entry in cost.items():
        lines.append(
            f"- {name}: base {entry['base_ms_per_example']:.2f}, C3PO "
            f"{entry['c3po_ms_per_example']:.2f} ({entry['ratio']:.2f}×)"
        )
    for name in SETS:
        tasks = list(summary["per_task"]["base"][name])
        lines += ["", f"Per-task accuracy (%), {name}:", ""]
        rows = [
            [method, *(f"{100 * summary['per_task'][method][name][t]:.1f}" for t in tasks)]
            for method in methods
        ]
        lines.append(to_markdown(Table(["method", *tasks], rows)))
    return "\n".join(lines) + "\n"
