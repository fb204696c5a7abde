"""Model-level evaluation: perplexity, routing statistics, greedy decoding, task accuracy with
BLEU/ROUGE, multiple-choice scoring and projection alignment, each against an independent
computation (float64 references, single-example loops, constructed models, the metrics)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moealign.data.batching import IGNORE_INDEX, encode_example
from moealign.data.tasks import (
    OPTION_LETTERS,
    TaskExample,
    TaskSuiteConfig,
    build_task_suite,
    multiple_choice_view,
)
from moealign.data.tokenizer import ByteTokenizer
from moealign.evaluation import diagnostics
from moealign.evaluation.diagnostics import routing_projection_alignment
from moealign.evaluation.generation import greedy_generate
from moealign.evaluation.lm import evaluate_lm
from moealign.evaluation.metrics import bleu, rouge_l
from moealign.evaluation.multiple_choice import option_log_likelihoods, score_multiple_choice
from moealign.evaluation.tasks import evaluate_suite, evaluate_tasks
from moealign.nn.transformer import ModelConfig, MoETransformer

TOKENIZER = ByteTokenizer()
TINY = dict(
    vocab_size=TOKENIZER.vocab_size,
    d_model=32,
    n_layers=2,
    n_heads=4,
    max_seq_len=96,
    expert_d_ff=16,
    n_experts=4,
    top_k=2,
    d_ff=64,
)


def tiny_model(seed: int = 0, **overrides) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(ModelConfig(**TINY | overrides))


def random_batches(n_rows: list[int], seq_len: int, seed: int, ignore_fraction: list[float]):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for rows, fraction in zip(n_rows, ignore_fraction, strict=True):
        input_ids = torch.randint(0, TOKENIZER.vocab_size, (rows, seq_len), generator=generator)
        labels = torch.randint(0, TOKENIZER.vocab_size, (rows, seq_len), generator=generator)
        labels[torch.rand(rows, seq_len, generator=generator) < fraction] = IGNORE_INDEX
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


class SpellingModel(nn.Module):
    """A stand-in LM whose logits continue every prefix of the given token sequences with that
    sequence's next token (one-hot, 10 nats above the rest); unknown prefixes get zeros."""

    def __init__(self, sequences: list[list[int]], vocab_size: int):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))
        self.vocab_size = vocab_size
        self.next_token = {}
        for sequence in sequences:
            for i in range(len(sequence) - 1):
                self.next_token[tuple(sequence[: i + 1])] = sequence[i + 1]

    def forward(self, input_ids_BS):
        batch, seq_len = input_ids_BS.shape
        logits = torch.zeros(batch, seq_len, self.vocab_size)
        for b, row in enumerate(input_ids_BS.tolist()):
            for s in range(seq_len):
                token = self.next_token.get(tuple(row[: s + 1]))
                if token is not None:
                    logits[b, s, token] = 10.0
        return SimpleNamespace(logits=logits, routing=[])


def spelling_model(examples: list[TaskExample], answers: list[str]) -> SpellingModel:
    sequences = []
    for example, answer in zip(examples, answers, strict=True):
        prompt_ids, answer_ids = encode_example(
            TaskExample(example.task, example.prompt, answer), TOKENIZER
        )
        sequences.append(prompt_ids + answer_ids)
    return SpellingModel(sequences, TOKENIZER.vocab_size)


def wrong(answer: str) -> str:
    return answer + " x"


# --- language modelling ---------------------------------------------------------------------


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size():
    model = tiny_model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = evaluate_lm(model, random_batches([3, 2], 12, seed=1, ignore_fraction=[0.3, 0.5]))
    assert result.perplexity == pytest.approx(TOKENIZER.vocab_size, rel=1e-6)
    assert result.loss == pytest.approx(math.log(TOKENIZER.vocab_size), rel=1e-6)


def test_nll_is_token_weighted_over_labels_not_ignored():
    model = tiny_model(tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)  # sharp logits: batches differ in mean loss
    batches = random_batches([4, 1], 16, seed=2, ignore_fraction=[0.1, 0.8])
    model.eval()
    nll_sums, counts = [], []
    with torch.no_grad():
        for batch in batches:
            log_probs = model(batch["input_ids"]).logits.double().log_softmax(-1)
            mask = batch["labels"] != IGNORE_INDEX
            picked = log_probs[mask].gather(-1, batch["labels"][mask].unsqueeze(-1))
            nll_sums.append(-float(picked.sum()))
            counts.append(int(mask.sum()))
    model.train()
    expected = sum(nll_sums) / sum(counts)
    mean_of_batch_means = sum(s / c for s, c in zip(nll_sums, counts, strict=True)) / 2
    assert abs(mean_of_batch_means - expected) > 1e-2  # the two readings are distinguishable
    result = evaluate_lm(model, batches)
    assert result.tokens == sum(counts)
    assert result.batches == 2
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert model.training  # restored
    record = result.record("val_")
    assert (record["val_loss"], record["val_ppl"]) == (result.loss, result.perplexity)


def test_routing_statistics_over_the_whole_set():
    model = tiny_model(seed=3)
    batches = random_batches([2, 3, 2], 10, seed=4, ignore_fraction=[0.0, 0.2, 0.4])
    model.eval()
    per_batch_counts, entropy_sums, n_tokens = [], torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            routing = model(batch["input_ids"]).routing
            counts = torch.stack(
                [torch.bincount(info.topk_idx.reshape(-1), minlength=4) for info in routing]
            ).double()
            per_batch_counts.append(counts)
            p = torch.stack([info.probs.double() for info in routing])  # (L, T, E)
            entropy_sums += -(p * p.log()).sum(-1).sum(-1) / math.log(4)
            n_tokens += p.shape[1]
    total = sum(per_batch_counts)
    routing = evaluate_lm(model, batches).routing
    assert routing.expert_counts.tolist() == total.tolist()
    torch.testing.assert_close(routing.max_vio, diagnostics.max_violation(total))
    by_batch = torch.stack([diagnostics.max_violation(c) for c in per_batch_counts]).mean(0)
    torch.testing.assert_close(routing.max_vio_batch, by_batch)
    assert not torch.allclose(routing.max_vio, routing.max_vio_batch)
    assert routing.dead_experts.tolist() == (total == 0).sum(-1).tolist()
    torch.testing.assert_close(routing.expert_utilisation, total / total.mean(-1, keepdim=True))
    usage = total / total.sum(-1, keepdim=True)
    expected_usage = -(usage * usage.log()).nan_to_num().sum(-1) / math.log(4)
    torch.testing.assert_close(routing.usage_entropy, expected_usage)
    torch.testing.assert_close(routing.token_entropy, entropy_sums / n_tokens)
    record = routing.record("val_routing/")
    assert record["val_routing/max_vio"] == pytest.approx(float(routing.max_vio.mean()))
    assert record["val_routing/layer1/usage_entropy"] == pytest.approx(float(expected_usage[1]))
    json.dumps(record)

    first_only = evaluate_lm(model, batches, max_batches=1)
    assert first_only.batches == 1
    assert first_only.routing.expert_counts.tolist() == per_batch_counts[0].tolist()


def test_dense_model_has_no_routing_entries():
    result = evaluate_lm(tiny_model(ffn="dense"), random_batches([2], 8, 5, [0.0]))
    assert result.routing is None
    assert set(result.record("val_")) == {"val_loss", "val_ppl", "val_tokens"}


def test_evaluate_lm_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="batches is empty"):
        evaluate_lm(model, [])
    with pytest.raises(ValueError, match="max_batches=0"):
        evaluate_lm(model, random_batches([1], 4, 0, [0.0]), max_batches=0)
    with pytest.raises(ValueError, match="no labelled token"):
        evaluate_lm(model, random_batches([1], 4, 0, [1.0]))
    with pytest.raises(ValueError, match="lacks \\['labels'\\]"):
        evaluate_lm(model, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}])


# --- greedy generation ----------------------------------------------------------------------


def single_example_greedy(model, prompt, max_new_tokens, eos_id):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token == eos_id:
                break
    return out


def test_greedy_generate_matches_a_single_example_loop_and_stops_at_eos():
    model = tiny_model(seed=7, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # clear argmax margins
    generator = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(0, 256, (n,), generator=generator).tolist() for n in (3, 7, 5, 7, 1, 9)
    ]
    model.eval()
    never = TOKENIZER.vocab_size  # an id the model cannot produce
    free_run = [single_example_greedy(model, p, 6, never) for p in prompts]
    eos_id = free_run[0][2]  # the third token of prompt 0 becomes EOS
    expected = [single_example_greedy(model, p, 6, eos_id) for p in prompts]
    model.train()
    assert expected[0] == free_run[0][:3]  # stopped after EOS, which is returned
    assert any(len(e) == 6 for e in expected)  # some rows run to the budget
    assert greedy_generate(model, prompts, 6, eos_id, batch_size=4) == expected
    assert greedy_generate(model, prompts, 6, never, batch_size=32) == free_run
    # one budget per prompt: each row stops at its own budget
    budgets = [1, 6, 2, 4, 3, 5]
    assert greedy_generate(model, prompts, budgets, never, batch_size=4) == [
        run[:budget] for run, budget in zip(free_run, budgets, strict=True)
    ]
    assert model.training


def test_greedy_generate_stops_at_the_model_context_and_rejects_bad_input():
    model = tiny_model(seed=8, max_seq_len=8)
    generated = greedy_generate(model, [[1, 2, 3, 4, 5, 6]], 10, eos_id=TOKENIZER.vocab_size)
    assert len(generated[0]) == 2
    with pytest.raises(ValueError, match="no room to generate"):
        greedy_generate(model, [list(range(8))], 1, 0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        greedy_generate(model, [[1]], 0, 0)
    with pytest.raises(ValueError, match="2 budgets for 1 prompts"):
        greedy_generate(model, [[1]], [1, 2], 0)
    with pytest.raises(ValueError, match="prompt_ids\\[1\\] is empty"):
        greedy_generate(model, [[1], []], 2, 0)


# --- task accuracy --------------------------------------------------------------------------

EXAMPLES = [
    TaskExample("reverse", "reverse: a b c =", "c b a", length=3),
    TaskExample("reverse", "reverse: d e =", "e d", length=2),
    TaskExample("addition", "addition: 12 + 5 =", "17", length=2),
    TaskExample("addition", "addition: 3 + 4 =", "7", length=1),
    TaskExample("sort", "sort: c a b d =", "a b c d", length=4),
    TaskExample("sort", "sort: b a =", "a b", length=2),
]


def test_oracle_model_scores_one_and_a_wrong_model_zero():
    answers = [e.answer for e in EXAMPLES]
    oracle = evaluate_tasks(spelling_model(EXAMPLES, answers), TOKENIZER, EXAMPLES, batch_size=2)
    assert list(oracle.tasks) == ["reverse", "addition", "sort"]
    assert oracle.macro_accuracy == 1.0
    assert oracle.correct_by_task() == {"reverse": [1, 1], "addition": [1, 1], "sort": [1, 1]}
    assert [p for r in oracle.tasks.values() for p in r.predictions] == answers

    wrong_model = spelling_model(EXAMPLES, [wrong(a) for a in answers])
    assert evaluate_tasks(wrong_model, TOKENIZER, EXAMPLES).macro_accuracy == 0.0
    # A generation cut at the reference's length must not count as right.
    assert evaluate_tasks(wrong_model, TOKENIZER, EXAMPLES[1:2]).macro_accuracy == 0.0


def test_whitespace_is_normalised_before_the_exact_match():
    example = TaskExample("reverse", "reverse: a b =", "b a")
    model = spelling_model([example], ["b   a  "])
    result = evaluate_tasks(model, TOKENIZER, [example], max_new_tokens=12)
    assert result.tasks["reverse"].predictions == ["b   a  "]
    assert result.tasks["reverse"].correct == [1]


def test_bleu_and_rouge_only_for_generation_tasks_and_equal_the_metrics():
    spelled = ["c b a", "d e", "17", "8", "a b d c", "a b"]  # examples 1, 3, 4 wrong
    result = evaluate_tasks(spelling_model(EXAMPLES, spelled), TOKENIZER, EXAMPLES)
    reverse, addition, sort = (result.tasks[t] for t in ("reverse", "addition", "sort"))
    assert (reverse.correct, addition.correct, sort.correct) == ([1, 0], [1, 0], [0, 1])
    assert result.macro_accuracy == pytest.approx(0.5)
    assert reverse.kind == sort.kind == "generation" and addition.kind == "classification"
    assert addition.bleu is None and addition.rouge_l is None
    assert "bleu" not in result.to_dict()["tasks"]["addition"]
    for task_result, strings, refs in (
        (reverse, spelled[:2], ["c b a", "e d"]),
        (sort, spelled[4:], ["a b c d", "a b"]),
    ):
        assert task_result.predictions == strings
        assert task_result.bleu == pytest.approx(bleu(strings, refs))
        assert task_result.rouge_l == pytest.approx(rouge_l(strings, refs))
        assert 0.0 < task_result.rouge_l < 1.0
    json.dumps(result.to_dict())


def test_evaluate_suite_reports_every_set_and_the_seen_and_heldout_means():
    suite = build_task_suite(
        TaskSuiteConfig(
            tasks=("reverse", "addition", "subtraction", "sort", "sort_then_reverse"),
            heldout_tasks=("subtraction",),
            heldout_compositions=("sort_then_reverse",),
            examples_per_task=20,
            eval_examples_per_task=3,
            train_lengths=(2, 3),
            long_lengths=(4, 4),
        )
    )
    sets = suite.evaluation_sets()
    seen = sets["test"] + sets["long_lengths"]
    heldout = sets["heldout_tasks"] + sets["heldout_compositions"]
    # Right on seen tasks, wrong on held-out ones.
    model = spelling_model(
        seen + heldout, [e.answer for e in seen] + [wrong(e.answer) for e in heldout]
    )
    result = evaluate_suite(model, TOKENIZER, suite, batch_size=4)
    assert set(result["sets"]) == {"test", "heldout_tasks", "heldout_compositions", "long_lengths"}
    assert result["seen_mean"] == 1.0
    assert result["heldout_mean"] == 0.0
    assert result["sets"]["long_lengths"]["accuracy"] == 1.0
    assert set(result["sets"]["heldout_tasks"]["tasks"]) == {"subtraction"}
    assert result["sets"]["test"]["tasks"]["reverse"]["correct"] == [1] * 3
    json.loads(json.dumps(result))
    chosen = evaluate_suite(model, TOKENIZER, suite, batch_size=4, sets=("test", "heldout_tasks"))
    assert set(chosen["sets"]) == {"test", "heldout_tasks"}
    assert chosen["sets"]["test"] == result["sets"]["test"] and chosen["heldout_mean"] == 0.0


def test_evaluate_tasks_rejects_bad_input():
    model = spelling_model(EXAMPLES, [e.answer for e in EXAMPLES])
    with pytest.raises(ValueError, match="examples is empty"):
        evaluate_tasks(model, TOKENIZER, [])
    with pytest.raises(ValueError, match="task='riddle' is not a known task"):
        evaluate_tasks(model, TOKENIZER, [TaskExample("riddle", "q =", "a")])
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        evaluate_tasks(model, TOKENIZER, EXAMPLES, max_new_tokens=-1)


# --- multiple choice ------------------------------------------------------------------------


def manual_log_likelihood(model, prompt_ids, answer_ids):
    tokens = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = model(tokens[:, :-1]).logits[0].double().log_softmax(-1)
    positions = range(len(prompt_ids) - 1, tokens.shape[1] - 1)
    return sum(float(log_probs[s, tokens[0, s + 1]]) for s in positions)


@pytest.mark.parametrize("continuation", ["text", "letter"])
def test_multiple_choice_picks_the_option_with_the_largest_log_likelihood(continuation):
    model = tiny_model(seed=9, max_seq_len=128)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
    examples = multiple_choice_view(EXAMPLES, n_options=3, seed=1)
    model.eval()
    expected_scores, expected_correct = [], []
    for example in examples:
        candidates = example.options if continuation == "text" else OPTION_LETTERS[:3]
        scores = [
            manual_log_likelihood(
                model, *encode_example(TaskExample(example.task, example.prompt, c), TOKENIZER)
            )
            for c in candidates
        ]
        expected_scores.append(scores)
        best = max(range(len(scores)), key=scores.__getitem__)
        expected_correct.append(int(OPTION_LETTERS[best] == example.answer))
    model.train()
    scores = option_log_likelihoods(model, TOKENIZER, examples, continuation, batch_size=4)
    for got, want in zip(scores, expected_scores, strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    result = score_multiple_choice(model, TOKENIZER, examples, continuation, batch_size=4)
    correct = [c for task_result in result.tasks.values() for c in task_result.correct]
    assert correct == expected_correct
    assert all(r.kind == "multiple_choice" and r.bleu is None for r in result.tasks.values())
    assert model.training


def test_multiple_choice_oracle_and_bad_input():
    examples = multiple_choice_view(EXAMPLES, n_options=4, seed=2)
    model = spelling_model(examples, [e.options[OPTION_LETTERS.index(e.answer)] for e in examples])
    assert score_multiple_choice(model, TOKENIZER, examples).macro_accuracy == 1.0
    with pytest.raises(ValueError, match="examples\\[0\\].*not a multiple-choice example"):
        score_multiple_choice(model, TOKENIZER, EXAMPLES)
    with pytest.raises(ValueError, match="continuation='option'"):
        score_multiple_choice(model, TOKENIZER, examples, continuation="option")


# --- projection alignment -------------------------------------------------------------------


def test_projection_alignment_uses_the_effective_router_rows():
    mpi = tiny_model(seed=10, router="mpi")
    alignment = routing_projection_alignment(mpi)
    assert len(alignment) == 2
    for value, layer in zip(alignment, mpi.moe_layers, strict=True):
        rows = layer.router.effective_weight(layer.router_drive_matrix())
        expected = diagnostics.projection_alignment(rows, layer.experts.w_gate).mean()
        assert value == pytest.approx(float(expected))
        assert 0.0 <= value <= 1.0
    plain = tiny_model(seed=10)
    for value, layer in zip(routing_projection_alignment(plain), plain.moe_layers, strict=True):
        expected = diagnostics.projection_alignment(layer.router.weight, layer.experts.w_gate)
        assert value == pytest.approx(float(expected.mean()))
    # Many power steps turn every row into W_g[e]'s top right singular vector: λ_e → 1.
    converged = tiny_model(seed=10, router="mpi", router_options={"power_steps": 300})
    assert routing_projection_alignment(converged) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert routing_projection_alignment(tiny_model(ffn="dense")) == []
