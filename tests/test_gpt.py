"""G.pt model, tokenisation, permutation augmentation, training and saving (all on tiny CPU settings)."""

import json

import numpy as np
import pytest
import torch

from gptpipe import problems
from gptpipe.evaluation import sampling as evaluation
from gptpipe.gpt import model as gpt
from gptpipe.gpt.pairs import gather_pairs
from gptpipe.gpt.trainer import PAIRINGS, Trainer, TrainConfig, load_model

DIGITS = problems.get("digits_mlp")
MNIST = problems.get("mnist_mlp")
MICRO = dict(width=32, depth=1, heads=2, num_frequencies=8)


def layers_of(problem):
    return [[layer.name, list(layer.shape)] for layer in problem.layers]


@pytest.mark.parametrize("problem", [DIGITS, MNIST])
@pytest.mark.parametrize("max_chunk", [7, 64, 1000])
def test_tokenize_detokenize_is_identity(problem, max_chunk):
    sizes = [layer.numel for layer in problem.layers]
    shapes = [list(layer.shape) for layer in problem.layers]
    x = torch.randn(3, problem.n_params)
    for units in (None, problem.unit_axes):
        tok = gpt.Tokenizer(shapes, max_chunk, units)
        tokens = tok.to_tokens(x)
        assert tokens.shape == (3, tok.n_tokens, tok.chunk_len)
        assert torch.equal(tok.from_tokens(tokens), x)
        assert torch.equal(tokens * (1 - tok.mask), torch.zeros_like(tokens))  # padding is zero
    # chunks stay inside one layer
    bounds = np.cumsum([0] + sizes)
    for start, size, li in gpt.chunk_layout(sizes, max_chunk):
        assert size <= max_chunk and bounds[li] <= start and start + size <= bounds[li + 1]


def test_written_out_attention_matches_torch_sdpa():
    block = gpt.Block(width=32, heads=4, mlp_ratio=4, adaln=False)
    x = torch.randn(5, 11, 32)
    q, k, v = block.qkv(x).view(5, 11, 3, 4, 8).permute(2, 0, 3, 1, 4)
    reference = block.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(5, 11, 32))
    torch.testing.assert_close(block.attention(x), reference)


def test_unit_tokens_follow_the_permutation_symmetry():
    """Permuting hidden units permutes the unit tokens, and the unit-token model's output with them."""
    tok = gpt.Tokenizer([list(layer.shape) for layer in DIGITS.layers], 1000, DIGITS.unit_axes)
    assert tok.n_tokens == DIGITS.hidden + 1  # ten units + the output bias
    x = torch.randn(2, DIGITS.n_params)
    perm = DIGITS.sample_permutation(2, torch.Generator().manual_seed(0))
    a, b = tok.to_tokens(x), tok.to_tokens(DIGITS.permute(x, perm=perm))
    for k in range(2):
        assert torch.equal(b[k, : DIGITS.hidden], a[k, perm[k]])
    cfg = gpt.GptConfig(layers=layers_of(DIGITS), units=[list(u) for u in DIGITS.unit_axes], conditioning="adaln",
                        fuse_inputs=True, **MICRO)
    model = gpt.Gpt(cfg)
    torch.nn.init.normal_(model.decode.weight, std=0.02)
    start, t, m = torch.randn(2, DIGITS.n_params), torch.tensor([10, 900]), torch.tensor([2.0, 1.0])
    out = model(x, start, t, m, m - 0.5)
    out_p = model(DIGITS.permute(x, perm=perm), DIGITS.permute(start, perm=perm), t, m, m - 0.5)
    torch.testing.assert_close(out_p, DIGITS.permute(out, perm=perm), rtol=1e-4, atol=1e-5)


def test_permutation_preserves_function_and_pairs_share_it():
    g = torch.Generator().manual_seed(0)
    theta = DIGITS.init([torch.Generator().manual_seed(s) for s in range(4)])
    later = theta + 0.1 * torch.randn(theta.shape, generator=g)
    x = torch.randn(4, 16, 64, generator=g)
    perm = DIGITS.sample_permutation(4, g)
    for t in (theta, later):
        p = DIGITS.permute(t, perm=perm)
        assert not torch.equal(p, t)
        torch.testing.assert_close(DIGITS.logits(p, x), DIGITS.logits(t, x))
    # the same perm moves both checkpoints alike: their difference is permuted the same way
    torch.testing.assert_close(DIGITS.permute(later, perm=perm) - DIGITS.permute(theta, perm=perm),
                               DIGITS.permute(later - theta, perm=perm))


def test_trainer_permutes_both_checkpoints_of_a_pair_jointly():
    # checkpoint c of run r = base_r + c * (a per-run random vector): theta_j - theta_i = (j - i) * v_r.
    # A joint permutation keeps (theta_j - theta_i) / (j - i) equal to the permuted theta_1 - theta_0.
    R, C = 3, 5
    g = torch.Generator().manual_seed(1)
    base, v = torch.randn(R, 1, DIGITS.n_params, generator=g), torch.randn(R, 1, DIGITS.n_params, generator=g)
    params = base + torch.arange(C).view(1, C, 1) * v
    metric = torch.linspace(2, 1, C).repeat(R, 1)
    tr = Trainer(DIGITS, params, metric, TrainConfig(model=MICRO, pairing="uniform", batch_size=64))
    b = tr.batch(64)
    step = (b["theta_j"] - b["theta_i"])
    # each row's update is a permutation of some run's v; joint permutation keeps it a *multiple* of one
    # permuted v, so |update| sorted equals (j-i) * |v_r| sorted for some r
    sorted_v = v.squeeze(1).abs().sort(dim=1).values
    for row in step:
        s = row.abs().sort().values
        ratios = s.unsqueeze(0) / sorted_v
        assert any(torch.allclose(r, r.mean().expand_as(r), rtol=1e-3) for r in ratios)
    # and the pairs really are permuted (not left as stored)
    stored = params.reshape(R * C, -1)
    assert any(not any(torch.allclose(ti, row) for row in stored) for ti in b["theta_i"][:8])


def test_symmetry_of_training_pairs():
    """"auto": cartpole's pairs come in the canonical order of their start (both checkpoints moved alike)
    and its model samples in that order; digits' pairs are randomly permuted; "none" leaves pairs as stored."""
    cartpole = problems.get("cartpole")
    R, C = 4, 3
    g = torch.Generator().manual_seed(2)
    base = cartpole.init([torch.Generator().manual_seed(s) for s in range(R)]).unsqueeze(1)
    v = 0.05 * torch.randn(R, 1, cartpole.n_params, generator=g)
    params = base + torch.arange(C).view(1, C, 1) * v
    metric = torch.linspace(20, 200, C).repeat(R, 1)
    tr = Trainer(cartpole, params, metric, TrainConfig(model=MICRO, pairing="uniform", batch_size=16))
    assert tr.gpt_config.canonical == "cartpole"
    b = tr.batch(16)
    identity = torch.arange(32).repeat(16, 2)
    assert torch.equal(cartpole.canonical_permutation(b["theta_i"]), identity)
    valid = torch.full((R,), C)
    b = gather_pairs(cartpole, params, metric, valid, 16, torch.Generator().manual_seed(0), "uniform", 0.5, "auto")
    perm = cartpole.canonical_permutation(params[b["run"], b["i"]])
    torch.testing.assert_close(b["theta_i"], cartpole.permute(params[b["run"], b["i"]], perm=perm))
    torch.testing.assert_close(b["theta_j"], cartpole.permute(params[b["run"], b["j"]], perm=perm))
    b = gather_pairs(cartpole, params, metric, valid, 16, torch.Generator().manual_seed(0), "uniform", 0.5, "none")
    torch.testing.assert_close(b["theta_i"], params[b["run"], b["i"]])
    stored = Trainer(cartpole, params, metric, TrainConfig(model=MICRO, batch_size=16, symmetry="none"))
    assert stored.gpt_config.canonical == ""
    digits = Trainer(DIGITS, torch.randn(2, 3, DIGITS.n_params), torch.rand(2, 3), TrainConfig(model=MICRO, batch_size=8))
    assert digits.gpt_config.canonical == ""
    with pytest.raises(ValueError, match="no canonical order"):
        Trainer(DIGITS, torch.randn(2, 3, DIGITS.n_params), torch.rand(2, 3), TrainConfig(model=MICRO, symmetry="canonical"))
    with pytest.raises(ValueError, match="symmetry must be one of"):
        TrainConfig(symmetry="sorted")
    # models saved with the old permute flag keep their meaning, and can still be resumed
    assert TrainConfig.from_dict({"permute": False}).symmetry == "none"
    assert TrainConfig.from_dict({"permute": True}).symmetry == "permute"
    from gptpipe.stages.train import lineage_matches

    saved = {"sweeps": ["s"], "problem": "digits_mlp", "train_config": {**TrainConfig().to_dict(), "permute": True}}
    del saved["train_config"]["symmetry"]
    assert lineage_matches(saved, {**saved, "train_config": TrainConfig(symmetry="permute").to_dict()}) == []
    assert lineage_matches(saved, {**saved, "train_config": TrainConfig(symmetry="canonical").to_dict()}) == ["train_config"]


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_pairings_draw_checkpoints_of_one_run_in_the_stated_order(pairing):
    from gptpipe.gpt.pairs import REVERSED_FRAC, STAY_FRAC, sample_pair_indices

    n_valid = torch.tensor([2, 5, 40, 40])
    run, i, j = sample_pair_indices(n_valid, 20_000, torch.Generator().manual_seed(0), pairing)
    stay = (i == j).float().mean().item()
    assert stay == pytest.approx(STAY_FRAC, abs=0.01) if pairing == "stay" else stay == 0
    assert (i >= 0).all() and (j >= 0).all()
    assert (torch.maximum(i, j) < n_valid[run]).all()
    backward = (i > j).float().mean().item()
    assert backward == pytest.approx(REVERSED_FRAC, abs=0.02) if pairing == "two-way" else backward == 0
    if pairing == "init":
        assert (i == 0).all()


def test_paper_preset_trains_with_the_papers_settings_unless_told_otherwise():
    paper = TrainConfig.for_preset(preset="paper")
    assert (paper.lr, paper.batch_size, paper.ema, paper.weight_decay, paper.grad_clip) == (4e-4, 1024, 0.9999, 0.1, 0.75)
    assert TrainConfig.for_preset(preset="paper", lr=1e-4).lr == 1e-4
    assert TrainConfig.for_preset(preset="tiny") == TrainConfig() == TrainConfig.for_preset()


def test_canonical_model_samples_from_the_canonical_start_and_answers_in_the_starts_order():
    cartpole = problems.get("cartpole")
    cfg = gpt.GptConfig(layers=layers_of(cartpole), canonical="cartpole", max_chunk=128, **MICRO)
    model = gpt.Gpt(cfg)  # untrained: predicts "no change"
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    start = cartpole.init([torch.Generator().manual_seed(s) for s in range(3)])
    start = start + 0.1 * torch.randn(start.shape, generator=torch.Generator().manual_seed(0))
    from gptpipe.gpt.diffusion import Diffusion

    out = evaluation.sample(model, Diffusion(), start, torch.full((3,), 50.0), torch.full((3,), 500.0), "ddim", 2,
                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, start, rtol=1e-5, atol=1e-6)  # back in the order it was given
    canonical = cartpole.permute(start, perm=cartpole.canonical_permutation(start))
    assert not torch.allclose(canonical, start)
    torch.testing.assert_close(seen[0], canonical)  # what the model read (param_scale 1: normalised = raw)


@pytest.mark.parametrize("conditioning", ["tokens", "adaln"])
@pytest.mark.parametrize("target", ["params", "delta"])
@pytest.mark.parametrize("fuse", [False, True])
def test_untrained_model_predicts_no_change(conditioning, target, fuse):
    cfg = gpt.GptConfig(layers=layers_of(DIGITS), conditioning=conditioning, target=target, fuse_inputs=fuse, **MICRO)
    model = gpt.Gpt(cfg)
    start = torch.randn(5, DIGITS.n_params)
    out = model(torch.randn(5, DIGITS.n_params), start, torch.randint(0, 1000, (5,)), torch.rand(5), torch.rand(5))
    assert out.shape == (5, DIGITS.n_params)
    torch.testing.assert_close(out, start if target == "params" else torch.zeros_like(start))


def test_config_presets_and_json_round_trip():
    paper = gpt.GptConfig.from_preset("paper", DIGITS.layers)
    assert (paper.width, paper.depth, paper.heads) == (1536, 12, 16)
    tiny = gpt.GptConfig.from_preset("tiny", DIGITS.layers, depth=2)
    assert tiny.depth == 2 and tiny.preset == "tiny"
    again = gpt.GptConfig.from_dict(json.loads(json.dumps(tiny.to_dict())))
    assert again == tiny
    with pytest.raises(ValueError):
        gpt.GptConfig.from_preset("huge", DIGITS.layers)


def test_normalizer_round_trip():
    params = torch.randn(4, 6, DIGITS.n_params) * torch.linspace(0.1, 2, DIGITS.n_params)
    sizes = [layer.numel for layer in DIGITS.layers]
    ps, ds, _ = gpt.Normalizer.fit(params, sizes, "layer")
    assert len(ps) == len(ds) == 4
    cfg = gpt.GptConfig(layers=layers_of(DIGITS), target="delta", param_scale=ps, delta_scale=ds, **MICRO)
    n = gpt.Normalizer(cfg)
    a, b = params[0, 0:1], params[0, 3:4]
    x0 = n.x0(n.normalize(b), n.normalize(a))
    torch.testing.assert_close(n.denormalize(n.params(x0, n.normalize(a))), b)


@pytest.fixture(scope="module")
def small_sweep():
    # learnable toy trajectories: each checkpoint shrinks the weights, and the metric tells how far
    R, C = 12, 6
    theta0 = DIGITS.init([torch.Generator().manual_seed(s) for s in range(R)])
    params = theta0.unsqueeze(1) * (1 - 0.1 * torch.arange(C)).view(1, C, 1)
    metric = 2.3 - 0.3 * torch.arange(C).float().repeat(R, 1)
    return params, metric


def test_tiny_training_run_reduces_loss(small_sweep):
    params, metric = small_sweep
    model = dict(MICRO, fuse_inputs=True, conditioning="adaln", target="delta")
    cfg = TrainConfig(model=model, unit_tokens=True, steps=60, batch_size=32, lr=3e-3, warmup=10, t_high_frac=0.5, seed=0)
    tr = Trainer(DIGITS, params, metric, cfg)
    losses = tr.train()
    assert tr.step == 60
    assert np.mean(losses[-15:]) < 0.6 * np.mean(losses[:15])


def test_save_load_and_resume(small_sweep):
    params, metric = small_sweep
    cfg = TrainConfig(model=MICRO, steps=40, batch_size=32, warmup=5, seed=3)
    tr = Trainer(DIGITS, params, metric, cfg)
    tr.step_many(10)
    blob = tr.state_dict_bytes()
    assert isinstance(blob, bytes)
    # resuming continues exactly as the uninterrupted trainer does
    resumed = Trainer.from_bytes(DIGITS, params, metric, blob)
    assert resumed.step == 10 and resumed.config == tr.config
    torch.testing.assert_close(torch.tensor(resumed.step_many(5)), torch.tensor(tr.step_many(5)))
    for a, b in zip(resumed.ema.parameters(), tr.ema.parameters()):
        torch.testing.assert_close(a, b)
    # a model loaded from bytes samples exactly what the trainer's EMA model samples
    model, diffusion, config = load_model(tr.state_dict_bytes())
    assert config == tr.gpt_config
    own, own_diffusion, _ = tr.sampler_model()
    start, m0, m1 = params[:4, 0], metric[:4, 0], metric[:4, -1]
    for sampler, steps in [("ddim", 1), ("ddpm", 5)]:
        a = evaluation.sample(model, diffusion, start, m0, m1, sampler, steps, torch.Generator().manual_seed(5))
        b = evaluation.sample(own, own_diffusion, start, m0, m1, sampler, steps, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_batches_gathered_ahead_train_exactly_as_batches_gathered_in_turn(small_sweep):
    """On a GPU the next batch's pairs are gathered in a thread while the device runs the step: the same
    pairs in the same order (one host stream), and the noise drawn where the trainer trains, so the
    losses are bit for bit those of gathering each batch in turn. Forced on here, on the CPU."""
    params, metric = small_sweep
    cfg = TrainConfig(model=MICRO, steps=40, batch_size=32, warmup=5, seed=4)
    in_turn, ahead = Trainer(DIGITS, params, metric, cfg), Trainer(DIGITS, params, metric, cfg)
    assert not in_turn.prefetch  # off on the CPU: the same cores would gather and train
    ahead.prefetch = True
    assert ahead.step_many(12) == in_turn.step_many(12)
    b = ahead.batch()
    assert b["noise"].device == b["t"].device == ahead.device and ahead.noise_generator.device == ahead.device
    # validation draws from a generator of its own: the training streams are not advanced
    state = (ahead.generator.get_state(), ahead.noise_generator.get_state())
    ahead.validation_loss(params, metric, n=16)
    assert all(torch.equal(a, b) for a, b in zip(state, (ahead.generator.get_state(), ahead.noise_generator.get_state())))


def test_trainer_holds_the_callers_checkpoints_without_a_copy(small_sweep):
    """The mnist_mlp demo's 5.2 GB of checkpoints: the trainer trains on the caller's array itself (a copy
    only leaves out unusable runs) and fits its normalisation without full-size temporaries."""
    params, metric = small_sweep
    cfg = TrainConfig(model=MICRO, steps=2, batch_size=8, warmup=1)
    assert Trainer(DIGITS, params, metric, cfg).params.data_ptr() == params.data_ptr()
    broken = metric.clone()
    broken[0, 1:] = float("nan")  # run 0 has one usable checkpoint: left out
    assert len(Trainer(DIGITS, params, broken, cfg).params) == len(params) - 1


def test_compiled_training_step_trains_as_the_eager_one(small_sweep):
    """``compile=True`` (the mnist_mlp demo's setting) runs the step through torch.compile: the same
    weights, the same batches, the same losses up to float rounding, and it saves and resumes."""
    params, metric = small_sweep
    model = dict(MICRO, fuse_inputs=True, conditioning="adaln", target="delta")
    cfg = TrainConfig(model=model, unit_tokens=True, steps=20, batch_size=16, warmup=2, seed=5)
    eager, compiled = Trainer(DIGITS, params, metric, cfg), Trainer(DIGITS, params, metric, TrainConfig(**{**cfg.to_dict(), "compile": True}))
    assert compiled.train_model is not compiled.model
    torch.testing.assert_close(torch.tensor(compiled.step_many(4)), torch.tensor(eager.step_many(4)), rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled.ema.parameters(), eager.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    resumed = Trainer.from_bytes(DIGITS, params, metric, compiled.state_dict_bytes())
    assert resumed.step == 4 and resumed.config.compile and resumed.train_model is not resumed.model


def test_unit_basis_carries_updates_in_its_span():
    """mnist_mlp's 784 incoming weights per unit enter and leave a token as k coordinates: an update in
    the fitted basis's span comes back exactly, and the fitted basis spans low-rank updates."""
    shapes = [shape for _, shape in layers_of(MNIST)]
    units = [list(u) for u in MNIST.unit_axes]
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(784, 6, generator=g)).Q.T  # 6 orthonormal input patterns
    deltas = torch.randn(200, MNIST.n_params, generator=g)
    deltas[:, :7840] = (torch.randn(200, 10, 6, generator=g) @ directions).reshape(200, -1)
    basis = gpt.fit_unit_basis(deltas, shapes, units, 6)
    assert basis.shape == (6, 784)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6), atol=1e-5, rtol=0)
    ub = gpt.UnitBasis(shapes, units, 6)
    ub.basis.copy_(basis)
    reduced = ub.reduce(deltas)
    assert reduced.shape == (200, MNIST.n_params - 10 * (784 - 6))
    torch.testing.assert_close(ub.expand(reduced), deltas, atol=1e-4, rtol=0)  # in the span: exact
    with pytest.raises(ValueError, match="unit_basis"):
        gpt.UnitBasis(shapes, units, 784)


def test_trainer_fits_a_unit_basis_only_where_tokens_outgrow_the_width():
    g = torch.Generator().manual_seed(1)
    params = torch.randn(6, 4, MNIST.n_params, generator=g) * 0.05
    metric = torch.rand(6, 4, generator=g)
    mnist = Trainer(MNIST, params, metric, TrainConfig(model=dict(MICRO, width=64), batch_size=8, warmup=2))
    assert mnist.gpt_config.unit_basis == 32  # a 795-value unit token in a 64-wide model: width / 2 coordinates
    basis = mnist.model.unit_basis.basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(32), atol=1e-4, rtol=0)
    mnist.step_many(2)
    model, _, config = load_model(mnist.state_dict_bytes())  # the basis travels with the weights
    assert config.unit_basis == 32 and torch.equal(model.unit_basis.basis, mnist.ema.unit_basis.basis)
    # digits' 75-value unit tokens fit the tiny preset's width of 128: raw weights, as before
    digits = Trainer(DIGITS, torch.randn(6, 4, DIGITS.n_params), metric, TrainConfig(model=dict(MICRO, width=128), batch_size=8))
    assert digits.gpt_config.unit_basis == 0 and digits.model.unit_basis is None


def test_bf16_autocast_on_a_cpu_only_where_it_has_hardware_bf16():
    """Emulated bf16 is 15x slower than fp32 on an AVX2-only CPU: "auto" must not pick it there."""
    from gptpipe.gpt.trainer import cpu_has_bf16, use_bf16

    big = gpt.GptConfig.from_preset("tiny", layers_of(DIGITS))  # width x depth = 1024: big enough to pay where it can
    cpu = torch.device("cpu")
    assert use_bf16(TrainConfig(), big, cpu) == cpu_has_bf16()
    assert use_bf16(TrainConfig(autocast="bf16"), big, cpu) and not use_bf16(TrainConfig(autocast="none"), big, cpu)
    assert not use_bf16(TrainConfig(), gpt.GptConfig.from_preset("tiny", layers_of(DIGITS), depth=2), cpu)
    assert use_bf16(TrainConfig(), big, torch.device("cuda"))


def test_guidance_moves_the_unprompted_prediction_towards_the_prompt():
    cfg = gpt.GptConfig(layers=layers_of(DIGITS), prompt_dropout=0.1, **MICRO)
    torch.manual_seed(0)
    model = gpt.Gpt(cfg).eval()
    with torch.no_grad():  # an untrained model predicts "no change" whatever it is told: give it weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_t, start = torch.randn(3, DIGITS.n_params), torch.randn(3, DIGITS.n_params)
    t, s, g = torch.tensor([10, 500, 999]), torch.tensor([2.3, 1.5, 2.0]), torch.tensor([0.3, 0.8, 0.5])
    prompted, unprompted = model(x_t, start, t, s, g), model(x_t, start, t, s, torch.full((3,), float("nan")))
    assert torch.isfinite(unprompted).all() and (prompted - unprompted).abs().max() > 1e-4  # "no prompt" is its own input
    torch.testing.assert_close(model.guided(x_t, start, t, s, g, 1.0), prompted)
    torch.testing.assert_close(model.guided(x_t, start, t, s, g, 3.0), unprompted + 3.0 * (prompted - unprompted), rtol=1e-4, atol=1e-5)
    # models trained without prompt dropout keep their weights' layout and refuse guidance
    plain = gpt.Gpt(gpt.GptConfig(layers=layers_of(DIGITS), **MICRO))
    assert not any("no_prompt" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="prompt dropout"):
        plain.guided(x_t, start, t, s, g, 2.0)


def test_prompt_dropout_trains_the_no_prompt_embedding(small_sweep):
    params, metric = small_sweep
    tr = Trainer(DIGITS, params, metric, TrainConfig(model=MICRO, steps=10, batch_size=32, warmup=2, prompt_dropout=0.5, guidance=2.0))
    assert tr.gpt_config.prompt_dropout == 0.5
    before = tr.model.no_prompt.detach().clone()
    losses = tr.train()
    assert np.isfinite(losses).all() and not torch.equal(tr.model.no_prompt.detach(), before)
    model, diffusion, _ = load_model(tr.state_dict_bytes())
    theta = evaluation.sample(model, diffusion, params[:2, 0], metric[:2, 0], metric[:2, -1], "ddim", 2, torch.Generator().manual_seed(0),
                              guidance=2.0)
    assert theta.shape == (2, DIGITS.n_params) and torch.isfinite(theta).all()
    with pytest.raises(ValueError, match="prompt_dropout"):
        TrainConfig(guidance=2.0)
