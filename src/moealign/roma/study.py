"""The RoMA study (DESIGN.md §5): ``moealign roma --base RUN_DIR --config configs/roma.toml``,
or on a transformers MoE model ``moealign roma --hf-model PATH --questions FILE.jsonl
--heldout-tasks TASK ...`` (:meth:`RomaStudy.from_hf_model`, :mod:`moealign.roma.questions`).

From a model pretrained with ``moealign train`` on the multi-task suite, the study evaluates on
the seen tasks' test split ("seen") and on the held-out tasks and compositions ("heldout"), all
in multiple-choice form:

* ``base``: the pretrained model;
* ``router_tuning``: routers of the chosen layers trained with the CE only (λ = 0);
* ``roma``: the same with the configured regulariser (``manifold`` = RoMA);
* ``oracle_tuning``: routers trained toward the oracle routing of the training questions;
* ``c3po``: test-time kernel-regression re-mixing towards the successful training neighbours;
* ``c3po_ngd``: C3PO's neighbourhood gradient descent (plain gradient steps) on the core
  experts' routing, its step size and count chosen per seed on seen-task validation questions;
* ``oracle``: per-question routing optimised with the label (the upper bound).

Every method's evaluation is timed: its inference cost is reported against the base model's
(test-time methods include embedding the questions and the neighbour search).

Questions are the suite's multiple-choice view (:func:`multiple_choice_questions`), in the
form the base model was trained on (``data.format``): lettered options in the prompt, or the
plain prompt with the options scored as continuations (cloze form, ``continuation="text"``).

Per seed, the training examples (``train_examples_per_task`` per seen task) are drawn afresh;
the base model's routing on them gives the targets r_j and the successful set S, which also
serves as C3PO's reference set. ``base`` and ``oracle`` do not depend on the seed. Results go
to ``OUT/results.json`` (per method × seed × set: per-task accuracy and per-example
correctness in :meth:`TaskEvaluation.to_dict` form; summaries: accuracy mean ± 95% t half
width over seeds, oracle-gap closure (A_m − A_base)/(A_oracle − A_base), CTGI on the held-out
tasks with a paired bootstrap interval beside the plain held-out gain — per seed, and over all
seeds with a hierarchical bootstrap (seeds, then questions) and its outcome — the RoMA −
router-tuning difference with its outcome, each method's inference cost)
and ``OUT/results.md`` (the tables).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moealign.compression.layers import moe_layer_views
from moealign.config import ConfigError, RunConfig
from moealign.data import TaskExample, multiple_choice_view
from moealign.data.build import build_data_suite, build_data_tokenizer
from moealign.data.tokenizer import Tokenizer, load_transformers_tokenizer
from moealign.evaluation.ctgi import CTGIResult, ctgi, normalized_gain
from moealign.evaluation.stats import (
    hierarchical_bootstrap_means,
    mean_confidence_interval,
    percentile_interval,
    seed_bootstrap_indices,
)
from moealign.evaluation.tasks import TaskEvaluation
from moealign.evaluation.verdicts import bootstrap_comparison, format_p, holm
from moealign.io import atomic_write_json, atomic_write_text, naming_file
from moealign.nn.routed import MoealignRouted, RoutedModel
from moealign.nn.transformer import MoETransformer
from moealign.progress import Phase
from moealign.progress import write as write_progress
from moealign.roma.baselines import (
    c3po_capture,
    c3po_ngd_capture,
    oracle_capture,
    oracle_tuning,
)
from moealign.roma.choices import Capture, capture, task_evaluation
from moealign.roma.config import RomaConfig
from moealign.roma.encoders import TextEncoder, build_encoder
from moealign.roma.neighbours import find_neighbours
from moealign.roma.questions import load_questions, split_questions
from moealign.roma.training import RouterTrainingConfig, train_routers
from moealign.tables import Table, to_markdown
from moealign.training.checkpoint import CheckpointError, load_latest
from moealign.training.runs import read_run_config

METHODS = ("base", "router_tuning", "roma", "oracle_tuning", "c3po", "c3po_ngd", "oracle")
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
    if not (run_dir / "config.json").is_file():
        raise ConfigError("base", f"got {str(run_dir)!r}, which holds no run (no config.json)")
    run_config = read_run_config(run_dir)
    model = MoETransformer(run_config.model)
    checkpoint = load_latest(
        run_dir / "checkpoints", fallback=True, apply=lambda ckpt: ckpt.load_model(model)
    )
    if checkpoint is None:
        raise CheckpointError(f"run directory {run_dir} has no checkpoint to load")
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


def _check_core_experts(config: RomaConfig, model: torch.nn.Module) -> None:
    """C3PO's core may hold at most the model's E experts."""
    if not {"c3po", "c3po_ngd"} & set(config.methods):
        return
    n_experts = moe_layer_views(model)[0].n_experts
    if config.c3po_core_experts > n_experts:
        raise ConfigError(
            "c3po_core_experts",
            f"got {config.c3po_core_experts}; expected at most the model's {n_experts} experts "
            "per MoE layer",
        )


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
        _check_core_experts(config, routed.model)
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
        from moealign.integrations.locations import pretrained_location

        try:  # the questions first: every input is checked before the weights load
            questions = load_questions(questions_path)
        except ValueError as err:
            raise ConfigError("--questions", str(err)) from None
        try:
            pool, test, heldout = split_questions(questions, heldout_tasks)
        except ValueError as err:  # the message names --heldout-tasks or the question count
            raise ConfigError("", str(err)) from None
        model_path = pretrained_location(model_path, "--hf-model")
        try:
            with naming_file("--hf-model", model_path):
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

    def _oracle(self, examples: Sequence[TaskExample]) -> Capture:
        c = self.config
        return oracle_capture(
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

    def _ngd(self, examples, neighbourhood, successful, choice: dict) -> Capture:
        """C3PO NGD on ``examples`` with the step size and count of ``choice``."""
        c = self.config
        return c3po_ngd_capture(
            self.routed,
            self.tokenizer,
            examples,
            self.layers,
            neighbourhood,
            successful,
            choice["steps"],
            choice["lr"],
            c.c3po_core_experts,
            c.token,
            c.continuation,
            c.eval_batch_size,
        )

    def _choose_ngd(self, train, reference_embeddings, successful, seed: int) -> dict:
        """NGD's step size and step count, chosen on seen-task validation questions: the first
        ``c3po_ngd_validation_per_task`` questions per task of the training pool that this
        seed did not draw (so neither a reference nor a test question). Every pair of
        ``c3po_ngd_lrs`` × ``c3po_ngd_steps`` is evaluated; the highest macro accuracy wins
        (the first in grid order on ties). Returns the choice and every candidate's accuracy."""
        c = self.config
        drawn = {id(example) for example in train}
        validation = _first_per_task(
            [e for e in self.train_pool if id(e) not in drawn], c.c3po_ngd_validation_per_task
        )
        if not validation:
            raise ValueError(
                f"seed {seed}: the training pool has no question outside the seed's draw; "
                "C3PO NGD needs validation questions to choose its step size"
            )
        neighbourhood = self._neighbours(
            self.encoder.encode([e.prompt for e in validation]), reference_embeddings, seed
        )
        grid = []
        for lr in c.c3po_ngd_lrs:
            for steps in c.c3po_ngd_steps:
                candidate = {"lr": lr, "steps": steps}
                result = self._ngd(validation, neighbourhood, successful, candidate)
                accuracy = _evaluation(validation, result).macro_accuracy
                grid.append(candidate | {"validation_accuracy": accuracy})
        best = max(grid, key=lambda entry: entry["validation_accuracy"])  # first on ties
        return {
            "lr": best["lr"],
            "steps": best["steps"],
            "validation_examples": len(validation),
            "grid": grid,
        }

    def _train(self, examples, regularizer: str, targets, neighbourhood, seed: int) -> dict:
        """Router tuning (``regularizer="none"``) or RoMA from the base model, evaluated."""
        c = self.config
        return self._train_and_evaluate(
            lambda: train_routers(
                self.routed,
                self.tokenizer,
                examples,
                self.layers,
                self._training_config(regularizer),
                token=c.token,
                continuation=c.continuation,
                targets_NP=targets,
                neighbourhood=neighbourhood,
                seed=seed,
            )
        )

    def _oracle_tuning(self, examples, seed: int) -> dict:
        """Oracle Tuning from the base model: the oracle routing of ``examples`` (its time and
        accuracy recorded in the history), then the routers trained toward it, evaluated."""
        c = self.config
        start = time.perf_counter()
        oracle = self._oracle(examples)
        targets_s = time.perf_counter() - start
        trained = self._train_and_evaluate(
            lambda: oracle_tuning(
                self.routed,
                self.tokenizer,
                examples,
                self.layers,
                oracle.routing_NP,
                self._training_config("none"),
                token=c.token,
                continuation=c.continuation,
                seed=seed,
            )
        )
        trained["history"]["oracle_targets_s"] = targets_s
        trained["history"]["oracle_train_accuracy"] = float(oracle.correct_N.float().mean())
        return trained

    def _training_config(self, regularizer: str) -> RouterTrainingConfig:
        c = self.config
        return RouterTrainingConfig(
            regularizer=regularizer,
            lambda_max=c.lambda_max,
            lambda_warmup_steps=c.lambda_warmup_steps,
            lr=c.lr,
            weight_decay=c.weight_decay,
            epochs=c.epochs,
            batch_size=c.batch_size,
        )

    def _train_and_evaluate(self, train) -> dict:
        """``train()`` from the base routers, then every evaluation set (timed); the base
        routers are restored afterwards."""
        self._restore_routers()
        history = train()
        evaluations, seconds = {}, {}
        for name, examples in self.eval_sets.items():
            start = time.perf_counter()
            evaluations[name] = _evaluation(examples, self._capture(examples))
            seconds[name] = time.perf_counter() - start
        self._restore_routers()
        return {
            "evaluations": evaluations,
            "seconds": seconds,
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
        timings: dict[str, dict[str, list[float]]] = {}  # method → set → seconds per run
        fixed: dict[str, dict[str, TaskEvaluation]] = {m: {} for m in ("base", "oracle")}
        test_time = [m for m in ("c3po", "c3po_ngd") if m in methods]
        eval_embeddings, embed_s = {}, {}
        for name, examples in self.eval_sets.items():
            start = time.perf_counter()
            fixed["base"][name] = _evaluation(examples, self._capture(examples))
            _record(timings, "base", name, start)
            write_progress(f"roma: base {name}: {fixed['base'][name].macro_accuracy:.3f}")
            if test_time:
                start = time.perf_counter()
                eval_embeddings[name] = self.encoder.encode([e.prompt for e in examples])
                embed_s[name] = time.perf_counter() - start
            if "oracle" not in methods:
                continue
            start = time.perf_counter()
            oracle = self._oracle(examples)
            fixed["oracle"][name] = _evaluation(examples, oracle)
            _record(timings, "oracle", name, start)
            write_progress(f"roma: oracle {name}: {fixed['oracle'][name].macro_accuracy:.3f}")
        seeds_info = {}
        seeds_done = Phase("roma: seeds", len(c.seeds))
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
            successful = [train[i] for i in success_S.tolist()]
            neighbourhood = self._neighbours(
                embeddings,
                embeddings[success_S],
                seed,
                query_ids=torch.arange(len(train)),
                reference_ids=success_S,
            )
            ngd_choice = None
            if "c3po_ngd" in methods:
                ngd_choice = self._choose_ngd(train, embeddings[success_S], successful, seed)
            for method in test_time:
                for name, examples in self.eval_sets.items():
                    # The test questions' embeddings (timed once above) count for each seed.
                    start = time.perf_counter() - embed_s[name]
                    test_neighbours = self._neighbours(
                        eval_embeddings[name], embeddings[success_S], seed
                    )
                    if method == "c3po":
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
                    else:
                        remixed = self._ngd(examples, test_neighbours, successful, ngd_choice)
                    _record(timings, method, name, start)
                    per_seed[method].setdefault(key, {})[name] = _evaluation(examples, remixed)
            seeds_info[key] = {
                "train_examples": len(train),
                "successful": int(success_S.numel()),
                "mean_neighbours": float(neighbourhood.valid_QK.sum(-1).float().mean()),
            }
            if ngd_choice is not None:
                seeds_info[key]["c3po_ngd"] = ngd_choice
            trainings = {
                "router_tuning": partial(self._train, train, "none", None, None, seed),
                "roma": partial(
                    self._train, train, c.regularizer, references_SP, neighbourhood, seed
                ),
                "oracle_tuning": partial(self._oracle_tuning, train, seed),
            }
            for method, run_training in trainings.items():
                if method in methods:
                    trained = run_training()
                    per_seed[method][key] = trained["evaluations"]
                    seeds_info[key][method] = trained["history"]
                    for name, seconds in trained["seconds"].items():
                        timings.setdefault(method, {}).setdefault(name, []).append(seconds)
            for method in methods:
                if method not in fixed:
                    accuracy = {
                        n: round(e.macro_accuracy, 3) for n, e in per_seed[method][key].items()
                    }
                    write_progress(f"roma: seed {seed}: {method} {accuracy}")
            seeds_done.update()
        seeds_done.close()
        results = self._results(per_seed, timings, seeds_info)
        atomic_write_json(out / RESULTS_FILE, results, indent=1, sort_keys=False)
        atomic_write_text(out / TABLE_FILE, markdown_tables(results))
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
            "inference_cost": inference_cost(
                timings, {n: len(ex) for n, ex in self.eval_sets.items()}
            ),
            "seeds": seeds_info,
        }


# Oracle-gap closure and CTGI need the oracle to beat the base model by at least this much
# (1 point of accuracy); below it the ratio is undefined or unstable and is reported as None.
MIN_HEADROOM = 0.01
# Equivalence margin of accuracy differences (a fraction: 1 point) and of CTGI.
MARGIN = 0.01
N_RESAMPLES = 2000


def macro_accuracy_replicates(
    systems: Sequence[dict[str, dict[str, TaskEvaluation]]],
    keys: Sequence[str],
    name: str,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Macro accuracy (mean over tasks of the accuracy over seeds and questions) of K systems on
    set ``name``, and its hierarchical bootstrap replicates (R, K): each replicate draws the
    seeds ``keys`` with replacement, the same draw for every task, then the questions of each
    task once for all seeds (crossed: every seed answers the same questions), the same
    questions for every system (:func:`moealign.evaluation.stats.hierarchical_bootstrap_means`).
    The interval thus holds the question-sampling variance beside the seed-to-seed one."""
    rng = np.random.default_rng(seed)
    seeds_RS = seed_bootstrap_indices(len(keys), n_resamples, rng)
    tasks = sorted(systems[0][keys[0]][name].tasks)
    estimate_K = np.zeros(len(systems))
    replicates_RK = np.zeros((n_resamples, len(systems)))
    for task in tasks:
        scores_KSN = np.array(
            [[by_seed[k][name].tasks[task].correct for k in keys] for by_seed in systems],
            dtype=np.float64,
        )
        estimate_K += scores_KSN.mean(axis=(1, 2))
        replicates_RK += hierarchical_bootstrap_means(scores_KSN, seeds_RS, rng, True)
    return estimate_K / len(tasks), replicates_RK / len(tasks)


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
    """CTGI on the held-out tasks (oracle upper bound) beside the plain held-out gain A_m − A_b
    with its paired interval; without an oracle only the gain (which needs no upper bound)."""
    empty = {"value": None, "ci_low": None, "ci_high": None}
    try:
        estimate = ctgi(
            method["heldout"].correct_by_task(),
            base["heldout"].correct_by_task(),
            upper_bound=oracle["heldout"].correct_by_task() if oracle is not None else 1.0,
            min_headroom=MIN_HEADROOM,
            n_resamples=1000,
            seed=int(seed),
        )
    except ValueError as err:  # no held-out task with headroom
        return empty | {"accuracy_gain": None, "reason": str(err)}
    gain = {
        "accuracy_gain": estimate.accuracy_gain,
        "gain_ci_low": estimate.gain_ci_low,
        "gain_ci_high": estimate.gain_ci_high,
    }
    if oracle is None:
        return empty | gain | {"reason": "no oracle run"}
    return gain | {
        "value": estimate.value,
        "ci_low": _finite_or_none(estimate.ci_low),
        "ci_high": _finite_or_none(estimate.ci_high),
        "per_task_gain": estimate.per_task_gain,
        "excluded_tasks": estimate.excluded_tasks,
        "small_headroom_share": estimate.small_headroom_share,
        "warning": estimate.warning,
    }


def _ctgi_over_seeds(by_seed, per_seed, keys: Sequence[str]) -> CTGIResult | str:
    """CTGI and the plain held-out gain over the base on every seed's answers together, with
    the hierarchical bootstrap (seeds, then questions, crossed: every seed answers the same
    questions) and their outcomes against 0 (margin :data:`MARGIN`); the oracle's answers are
    the upper bound (without it 1, and only the gain is reported). The reason as text when no
    held-out task has headroom."""

    def stacked(evaluations) -> dict[str, np.ndarray]:
        by_task = [evaluations[k]["heldout"].correct_by_task() for k in keys]
        return {task: np.array([seed[task] for seed in by_task]) for task in by_task[0]}

    oracle = per_seed.get("oracle")
    try:
        return ctgi(
            stacked(by_seed),
            stacked(per_seed["base"]),
            upper_bound=stacked(oracle) if oracle is not None else 1.0,
            min_headroom=MIN_HEADROOM,
            n_resamples=N_RESAMPLES,
            shared_examples=True,
            margin=MARGIN,
        )
    except ValueError as err:
        return str(err)


def _over_seeds_summary(found: dict[str, CTGIResult | str], has_oracle: bool) -> dict[str, Any]:
    """Per method: the held-out gain over the base and CTGI over all seeds
    (:func:`_ctgi_over_seeds`), their p-values Holm-adjusted over every such test of the
    study (one table), as :meth:`Comparison.to_dict`; None with the reason where undefined."""
    tests = [
        (method, kind, getattr(result, f"{kind}comparison"))
        for method, result in found.items()
        if not isinstance(result, str)
        for kind in ("gain_", *(("",) if has_oracle else ()))
    ]
    summary: dict[str, Any] = {
        method: {"accuracy_gain": None, "ctgi": None, "reason": result}
        if isinstance(result, str)
        else {"accuracy_gain": None, "ctgi": None}
        for method, result in found.items()
    }
    for (method, kind, _), comparison in zip(tests, holm([c for *_, c in tests]), strict=True):
        summary[method]["accuracy_gain" if kind else "ctgi"] = comparison.to_dict()
    return summary


def summarise(
    per_seed: dict[str, dict[str, dict[str, TaskEvaluation]]], seeds: Sequence[int]
) -> dict[str, Any]:
    """Accuracy (mean over seeds with its 95% t half width over seeds and its hierarchical
    bootstrap interval over seeds and questions, :func:`macro_accuracy_replicates`; and per
    task), oracle-gap closure, CTGI on the held-out tasks per seed (paired bootstrap over the
    questions, oracle per-example correctness as the upper bound) beside the plain held-out
    gain, and in ``over_seeds`` both over all seeds with the hierarchical interval and their
    outcomes (Holm over the methods' tests, :func:`_over_seeds_summary`); the RoMA −
    router-tuning difference of macro accuracy (hierarchical paired bootstrap, outcome within
    ±1 point, Holm over the two sets). Gap closure and CTGI are None without the oracle in
    ``per_seed``; the difference needs both RoMA and router tuning."""
    keys = [str(s) for s in seeds]
    has_oracle = "oracle" in per_seed
    summary: dict[str, Any] = {"accuracy": {}, "per_task": {}, "gap_closure": {}, "ctgi": {}}
    over_seeds: dict[str, CTGIResult | str] = {}
    for method, by_seed in per_seed.items():
        summary["accuracy"][method] = {}
        summary["per_task"][method] = {}
        summary["gap_closure"][method] = {}
        for name in SETS:
            values = [by_seed[k][name].macro_accuracy for k in keys]
            mean, half_width, _ = mean_confidence_interval(values)
            _, replicates_R1 = macro_accuracy_replicates([by_seed], keys, name)
            low, high = percentile_interval(replicates_R1[:, 0], 0.95)
            summary["accuracy"][method][name] = {
                "per_seed": values,
                "mean": mean,
                "half_width": None if np.isnan(half_width) else half_width,
                "ci_low": low,
                "ci_high": high,
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
            _ctgi_entry(
                by_seed[k], per_seed["base"][k], per_seed["oracle"][k] if has_oracle else None, k
            )
            for k in keys
        ]
        summary["ctgi"][method] = {
            "per_seed": estimates,
            "mean": _mean([e["value"] for e in estimates]),
            "accuracy_gain": _mean([e["accuracy_gain"] for e in estimates]),
        }
        if method not in ("base", "oracle"):  # CTGI 0 and 1 by construction
            over_seeds[method] = _ctgi_over_seeds(by_seed, per_seed, keys)
    summary["over_seeds"] = _over_seeds_summary(over_seeds, has_oracle)
    if {"roma", "router_tuning"} <= per_seed.keys():
        tests = []
        for name in SETS:
            estimate_K, replicates_RK = macro_accuracy_replicates(
                [per_seed["roma"], per_seed["router_tuning"]], keys, name
            )
            tests.append(
                bootstrap_comparison(
                    estimate_K[0] - estimate_K[1],
                    replicates_RK[:, 0] - replicates_RK[:, 1],
                    MARGIN,
                    n=len(keys),
                )
            )
        summary["roma_minus_router_tuning"] = {
            name: comparison.to_dict() for name, comparison in zip(SETS, holm(tests), strict=True)
        }
    return summary


def _record(timings: dict[str, dict[str, list[float]]], method: str, name: str, start: float):
    """Append the seconds since ``start`` to ``timings[method][name]``."""
    timings.setdefault(method, {}).setdefault(name, []).append(time.perf_counter() - start)


def inference_cost(
    timings: dict[str, dict[str, list[float]]], sizes: dict[str, int]
) -> dict[str, Any]:
    """Per method other than the base and set: its evaluation time per question (mean over
    seeds) against the base model's plain evaluation of the same questions. For C3PO (either
    surrogate) it includes embedding the questions and the neighbour search; for the trained
    methods it is the plain forward (ratio ≈ 1: their cost is in training); the oracle's is
    the per-question descent it needs the label for."""
    cost: dict[str, Any] = {}
    for method, by_set in timings.items():
        if method == "base":
            continue
        cost[method] = {}
        for name, seconds in by_set.items():
            base, mean = timings["base"][name][0], float(np.mean(seconds))
            cost[method][name] = {
                "base_ms_per_example": 1000 * base / sizes[name],
                "ms_per_example": 1000 * mean / sizes[name],
                "ratio": mean / base,
            }
    return cost


def _cell(entry: dict[str, Any]) -> str:
    """Accuracy (%): the mean over seeds and its hierarchical 95% interval (seeds, then
    questions), or the t half width over seeds where a results file has no such interval."""
    text = f"{100 * entry['mean']:.1f}"
    if entry.get("ci_low") is not None:
        return text + f" [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"
    half = entry.get("half_width")
    return text + (f" ± {100 * half:.1f}" if half is not None else "")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _verdict(entry: dict[str, Any] | None, scale: float = 1.0, unit: str = "") -> str:
    """A comparison (``Comparison.to_dict``) against 0: value [interval]: outcome (p, Holm p);
    "n/a" where undefined. ``scale``/``unit``: 100 and " pt" for accuracy fractions."""
    if entry is None:
        return "n/a"
    digits = 1 if scale != 1.0 else 3
    text = f"{scale * entry['delta']:+.{digits}f}"
    if entry["low"] is not None:
        text += f" [{scale * entry['low']:+.{digits}f}, {scale * entry['high']:+.{digits}f}]"
    else:
        text += " [interval n/a]"
    outcome = entry["outcome"]
    if outcome == "equivalent":
        outcome = f"equivalent within ±{scale * entry['margin']:g}{unit}"
    p_text = format_p(entry["p_value"])
    if entry["family"] > 1:
        p_text += f", Holm {format_p(entry['p_adjusted'])}"
    return f"{text}: {outcome} ({p_text})"


def markdown_tables(results: dict[str, Any]) -> str:
    """The main table (method × set accuracy, gap closure, held-out gain and CTGI with their
    outcomes) and the per-task table, for the methods the study ran."""
    summary = results["summary"]
    seeds = results["config"]["seeds"]
    methods = [m for m in METHODS if m in summary["accuracy"]]
    lines = [
        f"# RoMA study: {results['base_run']}",
        "",
        f"Accuracy (%) over seeds {list(seeds)}: the mean and its 95% hierarchical bootstrap"
        " interval (each replicate draws the seeds, then the questions, the same questions for"
        " every seed), so that question sampling counts beside the seed-to-seed spread; gap"
        " closure = (A − A_base)/(A_oracle − A_base) on the macro accuracy, mean over seeds;"
        " Δ held-out = the plain held-out accuracy gain over the base (points; mean over tasks)"
        " and CTGI on the held-out tasks (oracle upper bound), over all seeds with the same"
        " hierarchical paired interval, each with its outcome against 0 (bootstrap p,"
        " Holm-adjusted over the table's tests): higher / lower, equivalent within ±1 point"
        " (±0.01 CTGI; two one-sided tests) or inconclusive; n/a where bootstrap resamples left"
        " a task with no oracle headroom. CTGI weighs a task's gain by 1/headroom.",
        "",
    ]
    rows = []
    for method in methods:
        accuracy = summary["accuracy"][method]
        gaps = summary["gap_closure"][method]
        over_seeds = summary.get("over_seeds", {}).get(method) or {}
        reference = method in ("base", "oracle")
        rows.append(
            [
                method,
                _cell(accuracy["seen"]),
                _cell(accuracy["heldout"]),
                _number(gaps["seen"]["mean"]),
                _number(gaps["heldout"]["mean"]),
                "—" if reference else _verdict(over_seeds.get("accuracy_gain"), 100, " pt"),
                "—" if reference else _verdict(over_seeds.get("ctgi")),
            ]
        )
    header = ["method", "seen", "held-out", "gap closure seen", "gap closure held-out"]
    lines.append(to_markdown(Table([*header, "Δ held-out", "CTGI held-out"], rows)))
    warnings = [
        f"- {method}, seed {seed}: {entry['warning']}"
        for method in methods
        if method not in ("base", "oracle")  # CTGI 0 and 1 by construction
        for seed, entry in zip(seeds, summary["ctgi"][method]["per_seed"], strict=True)
        if entry.get("warning")
    ]
    if warnings:
        lines += ["", "CTGI warnings (read these CTGI values with the plain gain):", "", *warnings]
    if "roma_minus_router_tuning" in summary:
        lines += [
            "",
            "RoMA − router tuning (macro accuracy, points; paired hierarchical bootstrap over"
            " seeds and questions, Holm over the two sets):",
            "",
        ]
        for name, entry in summary["roma_minus_router_tuning"].items():
            lines.append(f"- {name}: {_verdict(entry, 100, ' pt')}")
    cost = results["inference_cost"]
    if cost:
        lines += [
            "",
            "Inference cost (ms per question, ratio to the base model's evaluation; C3PO includes"
            " embedding the question and the neighbour search):",
            "",
        ]
        base = next(iter(cost.values()))
        rows = [
            [
                "base",
                *(f"{base[n]['base_ms_per_example']:.2f}" for n in SETS),
                *["1.00"] * len(SETS),
            ]
        ]
        rows += [
            [
                method,
                *(f"{cost[method][n]['ms_per_example']:.2f}" for n in SETS),
                *(f"{cost[method][n]['ratio']:.2f}" for n in SETS),
            ]
            for method in METHODS
            if method in cost
        ]
        header = ["method", *(f"{n} ms" for n in SETS), *(f"{n} ×" for n in SETS)]
        lines.append(to_markdown(Table(header, rows)))
    for name in SETS:
        tasks = list(summary["per_task"]["base"][name])
        lines += ["", f"Per-task accuracy (%), {name}:", ""]
        rows = [
            [method, *(f"{100 * summary['per_task'][method][name][t]:.1f}" for t in tasks)]
            for method in methods
        ]
        lines.append(to_markdown(Table(["method", *tasks], rows)))
    return "\n".join(lines) + "\n"
