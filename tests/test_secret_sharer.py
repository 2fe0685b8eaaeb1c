"""The Secret Sharer: exact exposure by enumeration, extrapolation, extraction, memorization, the experiment."""

import itertools
import json
import math
import warnings

import pytest
import torch
from torch import nn

from privfast import secret_sharer
from privfast.attacks.exposure import (
    candidate_index,
    enumerate_log_perplexities,
    exposure,
    exposure_extrapolated,
    extract,
    log_perplexity,
    score_candidates,
    token_canary,
)
from privfast.cli import main
from privfast.models import LSTMLanguageModel, TransformerLanguageModel
from privfast.secret_sharer import SecretSharerConfig, canary_exposure, run_secret_sharer, train_language_model
from privfast.text import plant, windows


class PositionLM(nn.Module):
    """Logits depend on the position only, so every candidate's log-perplexity is a known sum."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)  # [T, V]
        self.vocab_size = table.shape[1]

    def forward(self, ids):
        n, t = ids.shape
        return self.table[:t].expand(n, t, -1)


def _brute_force(table, canary):
    """Every candidate's log-perplexity from the table, in lexicographic slot order."""
    nll = -table.double().log_softmax(-1)
    start = len(canary.prefix) - 1  # position t predicts token t + 1
    return torch.tensor(
        [
            sum(float(nll[start + j, canary.alphabet[a]]) for j, a in enumerate(digits))
            for digits in itertools.product(range(len(canary.alphabet)), repeat=len(canary.secret))
        ],
        dtype=torch.float64,
    )


def test_exact_exposure_equals_the_rank_formula_on_a_model_with_known_perplexities(one_thread):
    g = torch.Generator().manual_seed(0)
    model = PositionLM(torch.randn(8, 20, generator=g) * 2)
    canary = token_canary([3, 1], slots=4, alphabet=[2, 5, 7, 11, 19], generator=g)
    known = _brute_force(model.table.detach(), canary)
    enumerated = enumerate_log_perplexities(model, canary, chunk_size=7)
    assert torch.allclose(enumerated, known, atol=1e-5)
    secret = int(candidate_index(canary))
    rank = 1 + int((known < known[secret]).sum())  # candidates strictly likelier than the secret
    measured = canary_exposure(model, canary, references=300, generator=g)
    assert measured["exposure"] == pytest.approx(math.log2(len(known)) - math.log2(rank), abs=1e-9)
    assert measured["max_exposure"] == pytest.approx(math.log2(625))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LSTMLanguageModel(17, embed_dim=8, hidden_size=8),
        lambda: TransformerLanguageModel(17, dim=8, heads=2, context=10),
    ],
    ids=["lstm", "transformer"],
)
def test_enumeration_and_scoring_equal_whole_sequence_log_perplexity(make, one_thread):
    torch.manual_seed(0)
    model = make()
    canary = token_canary([0, 4, 9], slots=3, alphabet=[1, 2, 3, 5, 8], generator=torch.Generator().manual_seed(1))
    sequences = torch.cat([canary.sequence[None], canary.references()])  # all 125 candidates
    with torch.no_grad():
        direct = log_perplexity(model(sequences[:, :-1]), sequences[:, 1:], start=len(canary.prefix) - 1).double()
    slots = sequences[:, len(canary.prefix) :]
    enumerated = enumerate_log_perplexities(model, canary, chunk_size=4)
    assert torch.allclose(enumerated[candidate_index(canary, slots)], direct, atol=1e-5)
    assert torch.allclose(score_candidates(model, canary, slots, batch_size=16), direct, atol=1e-5)
    assert model.training  # the scoring put it back as it was


def test_extraction_lists_candidates_in_exact_order(one_thread):
    torch.manual_seed(0)
    model = LSTMLanguageModel(17, embed_dim=8, hidden_size=8)
    canary = token_canary([0, 4], slots=4, alphabet=[1, 2, 3, 5, 8, 13], generator=torch.Generator().manual_seed(2))
    every = enumerate_log_perplexities(model, canary)
    found = extract(model, canary, max_candidates=60, batch_size=7)
    assert torch.allclose(found.log_perplexities, every.sort().values[:60], atol=1e-6)
    # Large batches mix open nodes and complete candidates: the order must hold there too (edges of
    # very different costs, so that a complete candidate can cost more than an open node's child).
    spread = PositionLM(torch.randn(8, 17, generator=torch.Generator().manual_seed(4)) * 3)
    every_spread = enumerate_log_perplexities(spread, canary)
    wide = extract(spread, canary, max_candidates=300, batch_size=50)
    assert torch.allclose(wide.log_perplexities, every_spread.sort().values[:300], atol=1e-6)
    assert torch.allclose(every[candidate_index(canary, found.candidates)], found.log_perplexities, atol=1e-6)
    rank = 1 + int((every < every[candidate_index(canary)]).sum())
    assert found.secret_rank == (rank if rank <= 60 else None)
    limited = extract(model, canary, max_candidates=60, max_expansions=5)
    assert limited.exhausted and limited.expansions == 5 and len(limited.candidates) == 0


def test_extrapolated_exposure_is_within_a_bit_of_exact(one_thread):
    g = torch.Generator().manual_seed(3)
    model = PositionLM(torch.randn(10, 20, generator=g))
    canary = token_canary([0], slots=5, alphabet=list(range(10)), generator=g)
    every = enumerate_log_perplexities(model, canary)
    order = every.argsort()
    sample = every[torch.randint(0, len(every), (4000,), generator=g)]
    for rank in (30000, 3000, 300, 30):  # exposures from about 1.7 to 11.7 bits
        exact = math.log2(len(every)) - math.log2(rank)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the fit passes its own tail check
            fitted = float(exposure_extrapolated(every[order[rank - 1]][None], sample)[0])
        assert abs(fitted - exact) < 1.0, (rank, exact, fitted)


@pytest.fixture(scope="module")
def memorized():
    """A small non-private LSTM trained on random text holding one secret 64 times."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    vocab, digits = 40, list(range(20, 30))
    canary = token_canary([1, 2, 3], slots=5, alphabet=digits, generator=g)
    stream = torch.randint(4, 20, (16 * 320 + 1,), generator=g)
    rows, _ = plant(windows(stream, length=16), [torch.cat([canary.sequence, torch.tensor([1])])], [64], generator=g)
    torch.manual_seed(0)
    model = LSTMLanguageModel(vocab, embed_dim=24, hidden_size=24)
    train_language_model(model, rows, epochs=8, batch_size=32, lr=0.01, progress=False)
    return model, canary, digits


def test_memorizing_model_exposes_its_secret_and_extraction_recovers_it(memorized):
    model, canary, _ = memorized
    measured = canary_exposure(
        model, canary, references=2000, extraction_candidates=10, generator=torch.Generator().manual_seed(0)
    )
    assert measured["exposure"] > measured["max_exposure"] - 3  # log2(10^5) = 16.6 bits at most
    assert measured["extracted"] and measured["extraction_rank"] == 1


def test_secrets_never_trained_on_average_one_over_ln2_bits(memorized):
    model, _, digits = memorized
    g = torch.Generator().manual_seed(1)
    fresh = token_canary([1, 3, 2], slots=5, alphabet=digits, generator=g)  # a prefix never in training
    every = enumerate_log_perplexities(model, fresh)
    secrets = torch.randperm(len(every), generator=g)[:400]
    others = torch.ones(len(every), dtype=torch.bool)
    others[secrets] = False
    values = exposure(every[secrets], every[others]).tolist()
    # Uniform ranks give 1/ln 2 = 1.44 bits on average (standard error over 400 secrets: about 0.07).
    assert sum(values) / len(values) == pytest.approx(1 / math.log(2), abs=0.3)


# -- the experiment -----------------------------------------------------------------------------
WORDS = "the first second third last number key is a b c d e f and of to".split() + list("0123456789")


def _tiny_ptb(root, *, digits=True, tokens=6000):
    words = WORDS if digits else [w for w in WORDS if not w.isdigit()]
    g = torch.Generator().manual_seed(0)
    (root / "ptb").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", tokens), ("valid", 600), ("test", 600)):
        picks = torch.randint(0, len(words), (n,), generator=g).tolist()
        lines = [" ".join(words[i] for i in picks[j : j + 12]) for j in range(0, n, 12)]
        (root / "ptb" / f"ptb.{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _tiny_config(root, **changes):
    values = dict(
        corpus="ptb",
        data_root=str(root),
        epsilons=(math.inf, 4.0),
        repeats=(1, 4),
        width=8,
        window=16,
        epochs=1,
        batch_size=32,
        min_count=1,
        references=200,
        extraction_candidates=5,
        extraction_expansions=200,
    )
    return SecretSharerConfig(**{**values, **changes})


def test_experiment_writes_the_table_and_resumes(tmp_path, monkeypatch, one_thread):
    root = _tiny_ptb(tmp_path / "data")
    out = tmp_path / "run"
    result = run_secret_sharer(config=_tiny_config(root), out=out, progress=False)
    summary = json.loads((out / "exposure.json").read_text())
    assert [r["epsilon"] for r in summary["runs"]] == ["inf", "4"]
    assert len(summary["canaries"]) == 4 and {c["repeats"] for c in summary["canaries"]} == {1, 4}
    private = summary["runs"][1]
    assert private["private"] and private["epsilon_spent"] == pytest.approx(4.0, rel=0.05)
    for c in private["canaries"]:
        assert 0 <= c["exposure"] <= c["max_exposure"] and math.isfinite(c["exposure_extrapolated"])
    assert "exposure r=4" in result.table and "DP-SGD" in result.table and "RMSProp" in result.table
    assert (out / "exposure_vs_repeats.png").stat().st_size > 0 and (out / "exposure_vs_epsilon.png").is_file()
    assert "| DP-SGD | 4 |" in (out / "report.md").read_text()

    with pytest.raises(ValueError, match="holds a secret-sharer run"):
        run_secret_sharer(config=_tiny_config(root), out=out, progress=False)
    with pytest.raises(ValueError, match="width: 8 -> 16"):
        run_secret_sharer(config=_tiny_config(root, width=16), out=out, resume=True, progress=False)
    trained = []
    real = secret_sharer.train_language_model
    monkeypatch.setattr(
        secret_sharer, "train_language_model", lambda *a, **k: trained.append(k["epsilon"]) or real(*a, **k)
    )
    resumed = run_secret_sharer(
        config=_tiny_config(root, epsilons=(math.inf, 4.0, 1.0)), out=out, resume=True, progress=False
    )
    assert trained == [1.0]  # the two measured models are reused
    assert resumed.records[:2] == result.records


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(secret_sharer, "train_language_model", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="epsilons must be > 0"):
        SecretSharerConfig(epsilons=(8.0, 0.0))
    assert main(["secret-sharer", "--epsilons", "inf", "-1", "--out", str(tmp_path / "cli")]) == 2
    assert "epsilons must be > 0" in capsys.readouterr().err and not (tmp_path / "cli").exists()
    # A corpus too small for the canaries' windows: 6,500 tokens hold 25 windows of 256 (+1), the
    # canaries need 2 formats x (1 + 4 + 16 + 64).
    small = _tiny_ptb(tmp_path / "small")
    with pytest.raises(ValueError, match="holds 25 windows .* need 170 distinct windows"):
        run_secret_sharer(
            config=_tiny_config(small, window=256, repeats=(1, 4, 16, 64)), out=tmp_path / "a", progress=False
        )
    # Canary symbols missing from the vocabulary (PTB spells numbers as N: no digits).
    nodigits = _tiny_ptb(tmp_path / "nodigits", digits=False)
    with pytest.raises(ValueError, match="vocabulary lacks .*digits: 0, 1, 2"):
        run_secret_sharer(config=_tiny_config(nodigits), out=tmp_path / "b", progress=False)


@pytest.mark.parametrize("epsilon", [math.inf, 4.0])
def test_training_stopped_after_an_epoch_resumes_exactly(tmp_path, monkeypatch, epsilon, one_thread):
    rows = torch.randint(0, 30, (96, 9), generator=torch.Generator().manual_seed(0))

    def train(checkpoint):
        torch.manual_seed(0)
        model = LSTMLanguageModel(30, embed_dim=8, hidden_size=8)
        result = train_language_model(
            model,
            rows,
            epsilon=epsilon,
            epochs=3,
            batch_size=16,
            lr=0.5,
            optimizer="sgd",
            checkpoint=checkpoint,
            progress=False,
        )
        return model, result

    whole, whole_result = train(None)
    real_save, saves = secret_sharer.atomic_save, []

    def save_then_stop(state, path):
        real_save(state, path)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(secret_sharer, "atomic_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "checkpoint.pt")
    resumed, resumed_result = train(tmp_path / "checkpoint.pt")
    assert [r["epoch"] for r in resumed_result["history"]] == [1, 2, 3]
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # the same updates, noise and batches as the run never stopped
    assert resumed_result["epsilon"] == whole_result["epsilon"]


def test_spaces_beyond_the_exact_limit_are_extrapolated_from_scored_samples(one_thread):
    g = torch.Generator().manual_seed(5)
    model = PositionLM(torch.randn(10, 20, generator=g))
    canary = token_canary([0], slots=5, alphabet=list(range(10)), generator=g)
    exact = canary_exposure(model, canary, references=3000, generator=torch.Generator().manual_seed(0))
    sampled = canary_exposure(
        model, canary, references=3000, exact_limit=1000, generator=torch.Generator().manual_seed(0)
    )
    assert sampled["exposure"] is None and exact["exposure"] is not None
    assert sampled["log_perplexity"] == pytest.approx(exact["log_perplexity"], abs=1e-5)
    assert abs(sampled["exposure_extrapolated"] - exact["exposure"]) < 1.0


def test_character_level_canaries_spell_their_slots_as_characters():
    from privfast.text import load_corpus

    corpus = load_corpus("pydoc", level="char")
    made = secret_sharer.make_canaries(
        corpus, formats=["digits", "hex"], repeats=[1, 4], generator=torch.Generator().manual_seed(0)
    )
    assert [(c["format"], c["repeats"]) for c in made] == [("digits", 1), ("digits", 4), ("hex", 1), ("hex", 4)]
    first = made[0]
    text = corpus.decode(first["sequence"])
    assert text.startswith("\nthe first number is ") and text.endswith("\n") and len(text) == 1 + 20 + 5 + 1
    assert text[21:26].isdigit() and first["canary"].space_size == 10**5
    assert corpus.decode(made[2]["canary"].prefix) == "\nthe first key is "


def test_a_redirected_log_gets_one_bar_and_no_cursor_escapes(tmp_path):
    # Nested bars move the cursor up ("\x1b[A"); with stderr not a terminal only the outer bar shows.
    import subprocess
    import sys

    root = _tiny_ptb(tmp_path / "data")
    flags = ["--corpus", "ptb", "--data-root", str(root), "--epsilons", "inf", "4", "--repeats", "1", "4"]
    flags += ["--width", "8", "--window", "16", "--epochs", "2", "--batch-size", "32", "--min-count", "1"]
    flags += ["--references", "200", "--extraction-candidates", "5", "--extraction-expansions", "200"]
    done = subprocess.run(
        [sys.executable, "-m", "privfast.cli", "--threads", "1", "secret-sharer", *flags, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\x1b[A" not in done.stderr and "epsilons" in done.stderr
    assert "epoch 1" not in done.stderr and "exposure" not in done.stderr  # the nested bars stayed hidden
