"""v2 world model: the tricky maths against plain loops, the faithful preset's size, checkpoints,
and real tiny runs of every v2 script (train, DDP, kill-and-resume, evaluation, demo video)."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import imagination
from agent import AgentConfig, PolicyAgent
from conftest import REPO, load_script, run_script
from errors import UserError
from models import RSSM, NormGRUCell, RSSMConfig, WorldModel, kl_losses, twohot_bins, twohot_decode, twohot_encode

TINY_TRAIN = ["--preset", "tiny", "--threads", "1", "--batch-size", "4", "--seq-len", "8", "--log-every", "1"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the model ----------------------------------------------------------------------------
def test_faithful_preset_matches_the_original_sizes_and_shapes():
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("faithful")).eval()
    for module, millions in [(wm, 56.7), (wm.encoder, 14.1), (wm.decoder, 37.7), (wm.rssm, 4.2)]:
        assert count(module) == pytest.approx(millions * 1e6, rel=0.01)
    assert wm.encoder.grid == (256, 9, 10)
    assert isinstance(wm.rssm.cell, torch.nn.GRUCell) and wm.rssm.cell.input_size == 1024 + 8
    frames = torch.rand(1, 2, 3, 144, 160)
    with torch.no_grad():
        embed = wm.embed(frames)
        states = wm.rssm.observe(embed, torch.tensor([[1, 2]]))
        feat = imagination.features(states)
        out = wm.decode(feat)
    assert embed.shape == (1, 2, 512) and feat.shape == (1, 2, 512 + 1024)
    assert states["post_logp"].shape == (1, 2, 32, 32)
    assert out.shape == (1, 2, 3, 144, 160) and 0 <= out.min() and out.max() <= 1


def test_losses_and_weights_have_the_same_keys():
    cfg = RSSMConfig.from_preset("tiny")
    wm = WorldModel(cfg)
    frames, actions = torch.rand(2, 3, 3, 144, 160), torch.randint(0, 8, (2, 3))
    total, losses, metrics, _ = wm(frames, actions, torch.randn(2, 3), torch.ones(2, 3))
    assert losses.keys() == wm.loss_weights.keys()
    assert total.item() == pytest.approx(sum(wm.loss_weights[k] * v.item() for k, v in losses.items()), rel=1e-5)
    cfg = RSSMConfig.from_preset("faithful", kl_scale=2.0)  # the original: kl_scale * (0.8 dyn + 0.2 rep)
    assert cfg.kl_scale * cfg.kl_dyn == pytest.approx(1.6) and cfg.kl_scale * cfg.kl_rep == pytest.approx(0.4)
    assert cfg.free_nats == 0 and cfg.unimix == 0 and cfg.sampler == "gumbel" and cfg.recon_loss == "mean"


def test_decoder_blocks_add_residual_blocks_on_the_coarsest_grid():
    torch.manual_seed(0)
    plain, deeper = (WorldModel(tiles_config(decoder_blocks=n)) for n in (0, 2))
    channels = deeper.decoder.grid[0]
    block = 2 * (channels * channels * 9 + channels) + 2 * 2 * channels  # two 3x3 convs and two LayerNorms
    assert count(deeper) - count(plain) == 2 * block
    feat = torch.randn(2, 3, deeper.feat_dim)
    assert deeper.decode_raw(feat).shape == plain.decode_raw(feat).shape == (2, 3, 18, 20, 64)
    with pytest.raises(ValueError, match="decoder_blocks"):
        RSSMConfig.from_preset("tiny", decoder_blocks=-1)


def test_decoder_hidden_puts_a_hidden_layer_before_the_grid():
    torch.manual_seed(0)
    plain, hidden = (WorldModel(tiles_config(decoder_hidden=n)) for n in (0, 24))
    feat_dim, cells = plain.feat_dim, math.prod(plain.decoder.grid)
    # feat -> grid becomes feat -> 24 (+ a LayerNorm's gain and bias) -> grid
    assert count(hidden) - count(plain) == (feat_dim * 24 + 24) + 2 * 24 + (24 * cells + cells) - (feat_dim * cells + cells)
    feat = torch.randn(2, 3, feat_dim)
    assert hidden.decode_raw(feat).shape == plain.decode_raw(feat).shape == (2, 3, 18, 20, 64)
    with pytest.raises(ValueError, match="decoder_hidden"):
        RSSMConfig.from_preset("tiny", decoder_hidden=-1)


def test_decoder_broadcast_adds_a_per_cell_branch_before_the_tile_head():
    torch.manual_seed(0)
    plain, broad = (WorldModel(tiles_config(decoder_broadcast=n)) for n in (0, 12))
    feat_dim, width = plain.feat_dim, plain.decoder.tile_head.in_features
    # feat -> 12, one code of 12 per cell (18 x 20), a LayerNorm of 12, 12 -> the tile head's input width
    assert count(broad) - count(plain) == (feat_dim * 12 + 12) + 18 * 20 * 12 + 2 * 12 + (12 * width + width)
    feat = torch.randn(2, 3, feat_dim)
    with torch.no_grad():
        out = broad.decode_raw(feat)
        # by hand for one cell: the grid's features there plus the branch, then the tile head
        dec = broad.decoder
        grid = dec.deconvs(dec.fc(feat[0, :1]).view(-1, *dec.grid)).permute(0, 2, 3, 1)[0, 4, 7]
        branch = dec.broadcast["out"](dec.broadcast["inp"](feat[0, :1]) + dec.cell_codes[4, 7])[0]
    assert out.shape == plain.decode_raw(feat).shape == (2, 3, 18, 20, 64)
    assert torch.allclose(out[0, 0, 4, 7], dec.tile_head(grid + branch), atol=1e-5)
    for bad in (dict(decoder_broadcast=-1), dict(decoder_broadcast=8, frame_model="pixels")):
        with pytest.raises(ValueError, match="decoder_broadcast"):
            RSSMConfig.from_preset("tiny", **bad)


def test_decoder_slots_put_one_appearance_on_the_cell_their_softmaxes_pick():
    torch.manual_seed(0)
    plain, slotted = (WorldModel(tiles_config(decoder_slots=n)) for n in (0, 3))
    dec, feat_dim = slotted.decoder, slotted.feat_dim
    channels, rows, cols = dec.grid
    assert plain.decoder.slots is None
    assert count(slotted) - count(plain) == (feat_dim + 1) * 3 * (rows + cols + channels)
    with torch.no_grad():  # slot 1 alone, its logits peaked at row 2 and column 4, its appearance all ones
        dec.slots.weight.zero_(), dec.slots.bias.zero_()
        bias = dec.slots.bias.view(3, rows + cols + channels)
        bias[:, :rows + cols] = -1e4
        bias[1, 2], bias[1, rows + 4], bias[1, rows + cols:] = 0.0, 0.0, 1.0
        feat = torch.randn(2, feat_dim)
        spread = dec.slot_grid(feat)
        assert spread.shape == (2, channels, rows, cols)
        expected = torch.zeros_like(spread)
        expected[:, :, 2, 4] = 1.0
        assert torch.allclose(spread, expected)
        # the decoder adds it to its grid's linear layer before the transposed convolutions
        by_hand = dec.tile_head(dec.deconvs(dec.fc(feat).view(-1, *dec.grid) + expected).permute(0, 2, 3, 1))
        assert torch.allclose(slotted.decode_raw(feat[:, None])[:, 0], by_hand, atol=1e-5)
    slotted.decode_raw(torch.randn(2, 1, feat_dim)).sum().backward()  # the slots learn from the frame loss
    assert dec.slots.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="decoder_slots"):
        RSSMConfig.from_preset("tiny", decoder_slots=-1)


def test_local_latents_read_and_draw_their_own_cell():
    """local_latents: the last 90 of the latents belong to the 9 x 10 cells of the coarse grid; a cell's posterior
    reads that cell of the embedding alone (with h), and the decoder's coarse grid takes it at that cell alone; the
    rest of the model (KL, prior, training) sees stoch latents as before."""
    torch.manual_seed(0)
    cfg = tiles_config(stoch=94, local_latents=True)
    assert cfg.local_count() == 90 and cfg.coarse_grid() == (16, 9, 10)
    wm = WorldModel(cfg)
    rssm, dec, classes = wm.rssm, wm.decoder, cfg.classes
    embed = torch.randn(3, wm.encoder.out_dim)  # the encoder's grid, flat and channel-major: (16, 9 x 10)
    h = torch.randn(3, cfg.deter)
    moved = embed.clone().view(3, 16, 90)
    moved[:, :, 37] += 1.0  # one cell of the grid changes (row 3, column 7)
    moved = moved.flatten(1)
    with torch.no_grad():
        before, after = (rssm.posterior(h, rssm.post_embed_in(e)) for e in (embed, moved))
        assert before.shape == (3, 94, classes)
        changed = (before - after).abs().amax((0, 2)) > 1e-6  # which latents moved
        assert changed[4 + 37] and not changed[4:4 + 37].any() and not changed[4 + 38:].any()
        feat = torch.cat([h, rssm.sample(before, False)], -1)
        other = feat.clone()
        local = other[:, -90 * classes:].view(3, 90, classes)
        local[:, 52] = torch.roll(local[:, 52], 1, -1)  # cell 52 (row 5, column 2) shows another class
        diff = (dec.coarse(feat) - dec.coarse(other)).abs().amax((0, 1))  # (9, 10)
        assert diff[5, 2] > 0 and (diff > 0).sum() == 1
    total, _, _, states = wm(None, torch.randint(0, 8, (2, 3)), torch.zeros(2, 3), torch.ones(2, 3),
                             tile_ids=torch.randint(0, 64, (2, 3, 18, 20)), frame_metrics=False)
    total.backward()
    assert states["post_logp"].shape == (2, 3, 94, classes) and rssm.post_local[-1].weight.grad.abs().sum() > 0
    assert dec.local.weight.grad.abs().sum() > 0
    for bad in (dict(stoch=90), dict(stoch=94, embed_dim=32)):
        with pytest.raises(ValueError, match="local_latents"):
            tiles_config(local_latents=True, **bad)
    # two latents per cell: cell 37's are latents 4 + 74 and 4 + 75, drawn at that cell
    pair = WorldModel(tiles_config(stoch=184, local_latents=True, local_per_cell=2))
    with torch.no_grad():
        before, after = (pair.rssm.posterior(h, pair.rssm.post_embed_in(e)) for e in (embed, moved))
        changed = (before - after).abs().amax((0, 2)) > 1e-6
        assert changed[4:].nonzero().flatten().tolist() == [74, 75]  # of the local ones (global ones read all)
        feat = torch.cat([h, pair.rssm.sample(before, False)], -1)
        other = feat.clone()
        local = other[:, -180 * classes:].view(3, 90, 2, classes)
        local[:, 52, 1] = torch.roll(local[:, 52, 1], 1, -1)
        diff = (pair.decoder.coarse(feat) - pair.decoder.coarse(other)).abs().amax((0, 1))
        assert diff[5, 2] > 0 and (diff > 0).sum() == 1  # cell 52's second latent
    with pytest.raises(ValueError, match="local_per_cell"):
        tiles_config(stoch=94, local_latents=True, local_per_cell=0)


def test_local_latents_out_of_the_state_leave_the_gru_alone():
    """local_in_state=False: the GRU's next state reads the 4 global latents and the action, never the 90 local
    ones (which the posterior and decoder still use), and the model trains."""
    torch.manual_seed(0)
    cfg = tiles_config(stoch=94, local_latents=True, local_in_state=False)
    assert cfg.state_latents() == 4
    wm = WorldModel(cfg)
    rssm, classes = wm.rssm, cfg.classes
    h, z = torch.randn(3, cfg.deter), torch.rand(3, 94 * classes)
    other = z.clone()
    other[:, 4 * classes:] = torch.rand(3, 90 * classes)  # other local latents
    action = torch.tensor([0, 3, 7])
    with torch.no_grad():
        assert torch.equal(rssm.deter_step(h, z, action), rssm.deter_step(h, other, action))
        other[:, 0] += 1.0  # a global latent: read
        assert not torch.equal(rssm.deter_step(h, z, action), rssm.deter_step(h, other, action))
    total, _, _, _ = wm(None, torch.randint(0, 8, (2, 3)), torch.zeros(2, 3), torch.ones(2, 3),
                        tile_ids=torch.randint(0, 64, (2, 3, 18, 20)), frame_metrics=False)
    total.backward()
    assert rssm.post_local[-1].weight.grad.abs().sum() > 0 and wm.decoder.local.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="local_in_state"):
        tiles_config(local_in_state=False)


def test_observe_equals_a_step_by_step_posterior_loop_with_the_local_latents_made_after_it():
    """observe() draws local latents the GRU does not read after its loop, all steps at once: the same states,
    log-probs and gradients as the plain loop (each step's whole posterior, then its sample), from the first
    frame and from a state carried on; and where the GRU reads them (local_in_state), inside the loop as before."""
    for local_in_state in (False, True):
        torch.manual_seed(0)
        wm = WorldModel(tiles_config(stoch=94, local_latents=True, local_in_state=local_in_state,
                                     initial_from_frame=True))
        rssm, classes = wm.rssm, wm.cfg.classes
        embeds, actions = torch.randn(2, 4, wm.encoder.out_dim), torch.randint(0, 8, (2, 4))

        def plain(state=None):
            embed_in = rssm.post_embed_in(embeds)
            if state is None:
                h, z, logp = rssm.first_step(embed_in[:, 0], False)
                hs, zs, post, start = [h], [z], [logp], 1
            else:
                (h, z, prev), hs, zs, post, start = state, [], [], [], 0
            for t in range(start, 4):
                h = rssm.deter_step(h, z, actions[:, t - 1] if t else prev)
                logp = rssm.posterior(h, embed_in[:, t])
                z = rssm.sample(logp, False)
                hs.append(h), zs.append(z), post.append(logp)
            return {"h": torch.stack(hs, 1), "z": torch.stack(zs, 1), "post_logp": torch.stack(post, 1)}

        for state in (None, (torch.randn(2, wm.cfg.deter), torch.rand(2, 94 * classes), actions[:, 0])):
            grads = []
            for way in (lambda: rssm.observe(embeds, actions, state, sample=False), lambda: plain(state)):
                rssm.zero_grad()
                out = way()
                (out["post_logp"].exp() * torch.linspace(-1, 1, 94 * classes).view(94, classes)).sum().backward()
                grads.append([p.grad.clone() for p in rssm.parameters() if p.grad is not None])
                if len(grads) == 1:
                    got = {k: out[k].detach() for k in ("h", "z", "post_logp")}
            for key in got:
                torch.testing.assert_close(got[key], out[key].detach())
            assert len(grads[0]) == len(grads[1]) > 0
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b)


def test_tile_encoder_norms_its_table_once_per_tile_as_it_would_each_cell():
    """A tiles encoder puts its lookup's norm and activation on the table's rows (once per tile id): the same
    embeddings and gradients as on every cell of every frame, in float32 and under bfloat16 autocast; not with a
    batch norm (it reads the batch) nor while embed_dropout hides cells."""
    for conv_norm in ("layer", "none"):
        torch.manual_seed(0)
        cfg = tiles_config(conv_norm=conv_norm)
        per_tile, per_cell = WorldModel(cfg).encoder, WorldModel(cfg).encoder
        per_cell.load_state_dict(per_tile.state_dict())
        per_cell.per_tile_table = False
        assert per_tile.per_tile_table
        ids = torch.randint(0, 64, (6, 18, 20))
        for low in (False, True):
            grads = []
            for encoder in (per_tile, per_cell):
                encoder.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
                    out = encoder(ids)
                (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
                grads.append((out.detach().float(), [p.grad.clone() for p in encoder.parameters()]))
            (a, a_grads), (b, b_grads) = grads
            torch.testing.assert_close(a, b, atol=1e-2 if low else 1e-5, rtol=1e-2 if low else 1e-5)
            for x, y in zip(a_grads, b_grads):
                torch.testing.assert_close(x, y, atol=5e-2 if low else 1e-4, rtol=5e-2 if low else 1e-4)
    assert not WorldModel(tiles_config(conv_norm="batch")).encoder.per_tile_table


def test_embed_dropout_hides_whole_cells_in_training_only():
    torch.manual_seed(0)
    plain, masked = WorldModel(tiles_config()), WorldModel(tiles_config(embed_dropout=0.25))
    masked.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 64, (40, 18, 20))
    seen = []
    masked.encoder.convs.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    masked.train()
    masked.encoder(ids)
    cells = seen[-1].permute(0, 2, 3, 1)  # (N, 18, 20, C)
    hidden = (cells == 0).all(-1)
    assert 0.2 < hidden.float().mean() < 0.3  # whole cells, about a quarter of them
    torch.testing.assert_close(cells[~hidden], plain.encoder.tile_embed(ids)[~hidden] / 0.75)
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked.encoder(ids), plain.encoder(ids))  # evaluation reads every cell
    with pytest.raises(ValueError, match="embed_dropout"):
        tiles_config(embed_dropout=1.0)
    with pytest.raises(ValueError, match="tiles' only"):
        RSSMConfig.from_preset("tiny", embed_dropout=0.1)


def test_config_rejects_unknown_fields_and_wrong_types():
    with pytest.raises(ValueError, match="unknown RSSMConfig field"):
        RSSMConfig.from_dict({"detr": 3})
    with pytest.raises(ValueError, match="must be int"):
        RSSMConfig.from_dict({"deter": "big"})
    with pytest.raises(ValueError, match="divisible"):
        RSSMConfig.from_preset("default", image_size=(100, 100))
    with pytest.raises(ValueError, match="gru_blocks"):
        RSSMConfig.from_preset("default", gru_blocks=3)  # does not divide 256
    with pytest.raises(ValueError, match="gru_blocks"):
        RSSMConfig.from_preset("faithful", gru_blocks=2)  # nn.GRUCell has no blocks
    cfg = RSSMConfig.from_preset("tiny")
    assert RSSMConfig.from_dict(cfg.to_dict()) == cfg
    # a checkpoint written before gru_blocks existed rebuilds its dense GRU
    old = {k: v for k, v in RSSMConfig.from_preset("default").to_dict().items() if k != "gru_blocks"}
    assert RSSMConfig.from_dict(old).gru_blocks == 1


def test_block_gru_equals_a_dense_gru_with_a_block_diagonal_weight():
    torch.manual_seed(0)
    inp, size, blocks = 16, 24, 4
    cell = NormGRUCell(inp, size, blocks=blocks)
    dense = NormGRUCell(inp, size)
    kx, kh = inp // blocks, size // blocks
    with torch.no_grad():  # the dense gate (q, block g, j) reads only block g's slices of x and h
        weight = torch.zeros(3, blocks, kh, inp + size)
        for g in range(blocks):
            block = cell.block_weight[g].t().reshape(3, kh, kx + kh)  # rows (gate, j), columns [x_g, h_g]
            weight[:, g, :, g * kx:(g + 1) * kx] = block[..., :kx]
            weight[:, g, :, inp + g * kh:inp + (g + 1) * kh] = block[..., kx:]
        dense.linear.weight.copy_(weight.reshape(3 * size, inp + size))
    x, h = torch.randn(5, 3, inp), torch.randn(5, 3, size)
    torch.testing.assert_close(cell(x, h), dense(x, h), rtol=1e-5, atol=1e-6)
    # block 0's gates (before the LayerNorm, which spans all blocks) do not read another block's slice of h
    x, h = x.flatten(0, 1), h.flatten(0, 1)
    h2 = h.clone()
    h2[:, kh:] += 1.0
    first = lambda gates: gates.view(-1, blocks, 3, kh)[:, 0]  # noqa: E731
    torch.testing.assert_close(first(cell.gates(x, h)), first(cell.gates(x, h2)), rtol=0, atol=0)
    assert not torch.equal(cell.gates(x, h), cell.gates(x, h2))


def test_kl_balancing_equals_a_plain_loop():
    torch.manual_seed(0)
    post_logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    prior_logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    post, prior = post_logits.log_softmax(-1), prior_logits.log_softmax(-1)
    dyn, rep, kl = kl_losses(post, prior, free_nats=0.0)
    reference = torch.zeros(2, 3)
    p, q = post.detach().exp(), prior.detach().exp()
    for b in range(2):
        for t in range(3):
            for s in range(4):
                for k in range(5):
                    reference[b, t] += p[b, t, s, k] * math.log(p[b, t, s, k] / q[b, t, s, k])
    for value in (dyn, rep, kl):
        torch.testing.assert_close(value.detach(), reference, rtol=1e-5, atol=1e-6)
    # faithful: kl_scale * (0.8 * dyn + 0.2 * rep); dyn trains only the prior, rep only the posterior
    (0.8 * dyn.mean()).backward(retain_graph=True)
    assert post_logits.grad is None and prior_logits.grad.abs().sum() > 0
    prior_logits.grad = None
    (0.2 * rep.mean()).backward()
    assert prior_logits.grad is None and post_logits.grad.abs().sum() > 0


def test_overshooting_equals_a_plain_loop_over_starts_and_steps():
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny", overshoot=3, free_nats=0.5)).eval()
    frames, actions = torch.rand(2, 6, 3, 144, 160), torch.randint(0, 8, (2, 6))
    with torch.no_grad():
        states = wm.rssm.observe(wm.embed(frames), actions)
        loss, place = wm.overshoot_loss(states, actions)
        assert place is None
        terms = []
        for b in range(2):
            for t in range(5):
                h, z = states["h"][b:b + 1, t], states["z"][b:b + 1, t]
                for k in range(1, 4):
                    if t + k > 5:
                        break
                    h, z, prior = wm.rssm.img_step(h, z, actions[b:b + 1, t + k - 1], sample=False)
                    post = states["post_logp"][b:b + 1, t + k]
                    terms.append(max(0.5, (post.exp() * (post - prior)).sum().item()))
    assert len(terms) == 2 * (5 + 4 + 3)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # in training it is a weighted loss term and trains the prior and the recurrent cell
    wm.train()
    total, losses, _, _ = wm(frames, actions, torch.zeros(2, 6), torch.ones(2, 6))
    assert "overshoot" in losses and losses.keys() == wm.loss_weights.keys()
    losses["overshoot"].backward()
    assert wm.rssm.prior_net[0].weight.grad.abs().sum() > 0 and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in wm.rssm.cell.parameters())
    with pytest.raises(ValueError, match="overshoot"):
        RSSMConfig.from_preset("tiny", overshoot=-1)


def random_windows(batch: int, steps: int) -> tuple:
    """Made-up (batch, steps) windows for a tiny model's loss: frames, actions, rewards, continues, and RAM places as
    get_batch gives them, the scene bytes included."""
    frames, actions = torch.rand(batch, steps, 3, 144, 160), torch.randint(0, 8, (batch, steps))
    places = {"xs": torch.randint(0, 20, (batch, steps)), "ys": torch.randint(0, 30, (batch, steps)),
              "map_ids": torch.randint(0, 5, (batch, steps)), "facings": 4 * torch.randint(0, 4, (batch, steps)),
              "in_battles": torch.randint(0, 2, (batch, steps)).bool(),
              "dialog_opens": torch.randint(0, 2, (batch, steps)).bool()}
    return frames, actions, torch.zeros(batch, steps), torch.ones(batch, steps), places


def test_place_heads_read_the_posterior_and_every_open_loop_state():
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny", overshoot=2, place_scale=2.0)).eval()
    batch, steps = 2, 5
    frames, actions, rewards, continues, places = random_windows(batch, steps)
    with pytest.raises(ValueError, match="places"):
        wm(frames, actions, rewards, continues)
    with torch.no_grad():
        total, losses, _, states = wm(frames, actions, rewards, continues, places=places)

        def cross_entropy(feat, b, t):  # the four heads' cross-entropies of one state, by hand
            logits = wm.place_head(feat)
            wanted = {"xs": places["xs"][b, t], "ys": places["ys"][b, t], "map_ids": places["map_ids"][b, t],
                      "facings": places["facings"][b, t] // 4}
            return sum(-logits[name].log_softmax(-1)[0, wanted[name]].item() for name in wanted)

        post = [cross_entropy(torch.cat([states["h"][b:b + 1, t], states["z"][b:b + 1, t]], -1), b, t)
                for b in range(batch) for t in range(steps)]
        rolled = []
        for b in range(batch):
            for t in range(steps - 1):
                h, z = states["h"][b:b + 1, t], states["z"][b:b + 1, t]
                for k in range(1, 3):
                    if t + k >= steps:
                        break
                    h, z, _ = wm.rssm.img_step(h, z, actions[b:b + 1, t + k - 1], sample=False)
                    rolled.append(cross_entropy(torch.cat([h, z], -1), b, t + k))
    assert len(rolled) == batch * (4 + 3)
    assert losses["place"].item() == pytest.approx(np.mean(post) + np.mean(rolled), rel=1e-5)
    assert losses.keys() == wm.loss_weights.keys() and wm.loss_weights["place"] == 2.0
    assert total.item() == pytest.approx(sum(wm.loss_weights[k] * v.item() for k, v in losses.items()), rel=1e-5)
    # the open-loop part trains the prior (which the posterior states never pass through)
    wm.train()
    states = wm.rssm.observe(wm.embed(frames), actions)
    _, place = wm.overshoot_loss(states, actions, wm.place_head.targets(places))
    place.backward()
    assert wm.rssm.prior_net[0].weight.grad.abs().sum() > 0
    assert WorldModel(RSSMConfig.from_preset("tiny")).place_head is None  # off by default: no parameters
    with pytest.raises(ValueError, match="place_scale"):
        RSSMConfig.from_preset("tiny", place_scale=-1)


def test_place_rollout_scores_the_places_of_deep_open_loop_states():
    """place_rollout=2: from each window's first 2 posterior states the prior alone runs to the window's end, and
    the heads' loss on all those states is added to the place loss (against a loop by hand)."""
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny", place_scale=1.0, place_rollout=2)).eval()
    batch, steps = 3, 6
    frames, actions, rewards, continues, places = random_windows(batch, steps)
    targets = wm.place_head.targets(places)
    with torch.no_grad():
        _, losses, _, states = wm(frames, actions, rewards, continues, places=places)

        def cross_entropy(h, z, b, t):
            logits = wm.place_head(torch.cat([h, z], -1))
            return sum(-logits[name].log_softmax(-1)[0, targets[name][b, t]].item() for name in targets)

        post = [cross_entropy(states["h"][b:b + 1, t], states["z"][b:b + 1, t], b, t)
                for b in range(batch) for t in range(steps)]
        deep = []
        for b in range(batch):
            for s in range(2):
                h, z = states["h"][b:b + 1, s], states["z"][b:b + 1, s]
                for t in range(s + 1, steps):
                    h, z, _ = wm.rssm.img_step(h, z, actions[b:b + 1, t - 1], sample=False)
                    deep.append(cross_entropy(h, z, b, t))
    assert len(deep) == batch * (5 + 4)
    assert losses["place"].item() == pytest.approx(np.mean(post) + np.mean(deep), rel=1e-5)
    # it trains the prior, whose states nothing else here reads (no overshoot)
    wm.train()
    states = wm.rssm.observe(wm.embed(frames), actions)
    wm.place_rollout_loss(states, actions, targets).backward()
    assert wm.rssm.prior_net[0].weight.grad.abs().sum() > 0
    for bad in (dict(place_rollout=-1, place_scale=1.0), dict(place_rollout=2)):
        with pytest.raises(ValueError, match="place_rollout"):
            RSSMConfig.from_preset("tiny", **bad)


def test_place_scenes_add_battle_and_text_box_heads():
    """place_scenes=True: the place heads also read RAM's in-battle and dialog bytes (2 classes each), on the
    posterior and the open-loop states alike; off, the four place heads alone, as before."""
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny", place_scale=1.0, place_scenes=True, overshoot=1)).eval()
    batch, steps = 2, 4
    frames, actions, rewards, continues, places = random_windows(batch, steps)
    targets = wm.place_head.targets(places)
    assert list(targets) == ["xs", "ys", "map_ids", "facings", "in_battles", "dialog_opens"]
    with torch.no_grad():
        _, losses, _, states = wm(frames, actions, rewards, continues, places=places)
        feat = torch.cat([states["h"], states["z"]], -1)
        logits = wm.place_head(feat)
        assert logits["in_battles"].shape == logits["dialog_opens"].shape == (batch, steps, 2)
        scenes = sum(F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten()) for k in ("in_battles", "dialog_opens"))
        four = {k: v for k, v in targets.items() if k not in ("in_battles", "dialog_opens")}
        where = sum(F.cross_entropy(logits[k].flatten(0, 1), four[k].flatten()) for k in four)
        assert wm.place_head.loss(feat, targets).item() == pytest.approx((where + scenes).item(), rel=1e-5)
        _, rolled = wm.overshoot_loss(states, actions, targets)  # the open-loop states read the scenes too
        assert losses["place"].item() == pytest.approx((where + scenes + rolled).item(), rel=1e-5)
    plain = WorldModel(RSSMConfig.from_preset("tiny", place_scale=1.0))
    assert list(plain.place_head.targets(places)) == ["xs", "ys", "map_ids", "facings"] == list(plain.place_keys)
    assert WorldModel(RSSMConfig.from_preset("tiny")).place_keys == ()
    with pytest.raises(ValueError, match="place_scenes"):
        RSSMConfig.from_preset("tiny", place_scenes=True)


def test_initial_from_frame_reads_the_first_state_from_the_frame():
    """initial_from_frame=True: a sequence's first h is the initial net on that frame's projected embedding (so two
    frames give two states), the same whether a window is observed whole or a PolicyAgent observes it frame by
    frame, and the training loss reaches that net; False: zeros, as before."""
    torch.manual_seed(0)
    cfg = RSSMConfig.from_preset("tiny", initial_from_frame=True)
    wm = WorldModel(cfg).eval()
    frames, actions, rewards, continues, _ = random_windows(2, 3)
    with torch.no_grad():
        states = wm.rssm.observe(wm.embed(frames), actions)
        embed_in = wm.rssm.post_embed_in(wm.embed(frames)[:, 0])
        torch.testing.assert_close(states["h"][:, 0], wm.rssm.initial_net(embed_in[:, :cfg.hidden]))
        assert (states["h"][0, 0] - states["h"][1, 0]).abs().max() > 1e-3
    agent = PolicyAgent(cfg, AgentConfig())
    agent.wm.load_state_dict(wm.state_dict())
    agent.eval().reset()
    uint8 = (frames[0] * 255).round().byte().permute(0, 2, 3, 1).numpy()  # (T, H, W, 3), as the emulator gives them
    with torch.no_grad():
        seen = torch.from_numpy(uint8).permute(0, 3, 1, 2).float().div(255)[None]
        whole = wm.rssm.observe(wm.embed(seen), actions[:1])
    for t in range(3):  # the agent's belief, frame by frame, is the window's posterior (no sampling in eval)
        if t:
            agent.record_action(int(actions[0, t - 1]))
        torch.testing.assert_close(agent.observe(uint8[t]), torch.cat([whole["h"][:, t], whole["z"][:, t]], -1))
    wm.train()
    total, _, _, _ = wm(frames, actions, rewards, continues)
    total.backward()
    assert wm.rssm.initial_net[-2].weight.grad.abs().sum() > 0
    plain = WorldModel(RSSMConfig.from_preset("tiny")).eval()
    assert plain.rssm.initial_net is None
    with torch.no_grad():
        assert plain.rssm.observe(plain.embed(frames), actions)["h"][:, 0].abs().max() == 0


def test_place_heads_on_h_alone_read_no_latent():
    """place_input="deter": the heads read the GRU state h, never the latents z."""
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny", place_scale=1.0, place_input="deter"))
    feat = torch.randn(3, wm.feat_dim)
    other = feat.clone()
    other[:, wm.cfg.deter:] = torch.rand(3, wm.feat_dim - wm.cfg.deter)  # other latents
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(wm.place_head(feat).values(), wm.place_head(other).values()))
        other[:, 0] += 1.0  # h: read
        assert not torch.equal(wm.place_head(feat)["xs"], wm.place_head(other)["xs"])
    with pytest.raises(ValueError, match="place_input"):
        RSSMConfig.from_preset("tiny", place_input="z")


def test_free_bits_clip_each_step_below_but_not_above():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, requires_grad=True)
    same = logits.log_softmax(-1)
    dyn, rep, kl = kl_losses(same, same, free_nats=1.0)  # KL = 0 < 1 nat: clipped, no gradient
    assert torch.all(dyn == 1.0) and torch.all(rep == 1.0) and torch.all(kl.abs() < 1e-6)
    (dyn.sum() + rep.sum()).backward()
    assert logits.grad.abs().max() == 0
    sharp = (torch.randn(3, 2, 4) * 10).log_softmax(-1)
    other = (torch.randn(3, 2, 4) * 10).log_softmax(-1)
    dyn, rep, kl = kl_losses(sharp, other, free_nats=1.0)
    torch.testing.assert_close(dyn, kl.clamp(min=1.0))
    assert (kl > 1.0).any()


def test_twohot_symlog_round_trips():
    bins = twohot_bins(255, 20.0)
    values = torch.tensor([0.0, 0.3, -0.3, 1.0, -2.5, 7.0, 123.4, -1000.0, 5e4])
    weights = twohot_encode(values, bins)
    assert torch.allclose(weights.sum(-1), torch.ones(len(values)))
    assert ((weights > 0).sum(-1) <= 2).all()
    decoded = twohot_decode(weights.clamp(min=1e-30).log(), bins)
    torch.testing.assert_close(decoded, values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["gumbel", "categorical"])
@pytest.mark.parametrize("sample", [True, False])
def test_straight_through_samples_are_one_hot_and_pass_gradients(sampler, sample):
    torch.manual_seed(0)
    rssm = RSSM(RSSMConfig.from_preset("tiny", sampler=sampler), embed_dim=8)
    logits = torch.randn(5, rssm.cfg.stoch * rssm.cfg.classes, requires_grad=True)
    z = rssm.sample(rssm.log_probs(logits), sample=sample).view(5, rssm.cfg.stoch, rssm.cfg.classes)
    torch.testing.assert_close(z.detach().sum(-1), torch.ones(5, rssm.cfg.stoch))
    assert set(z.detach().round(decimals=5).unique().tolist()) <= {0.0, 1.0}
    (z * torch.randn_like(z)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_lambda_returns_equal_the_weighted_n_step_sum():
    torch.manual_seed(0)
    B, H, gamma, lam = 3, 6, 0.9, 0.8
    rewards, values, cont = torch.randn(B, H), torch.randn(B, H + 1), torch.rand(B, H)
    fast = imagination.lambda_returns(rewards, values, cont, gamma=gamma, lam=lam)
    reference = torch.zeros(B, H)
    for b in range(B):
        for t in range(H):
            def n_step(n):  # r_t + g c_t r_{t+1} + ... + (prod of g c) v_{t+n}
                total, discount = 0.0, 1.0
                for k in range(n):
                    total += discount * rewards[b, t + k]
                    discount *= gamma * cont[b, t + k]
                return total + discount * values[b, t + n]
            last = H - t
            reference[b, t] = sum((1 - lam) * lam ** (n - 1) * n_step(n) for n in range(1, last)) + lam ** (last - 1) * n_step(last)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_imagination_rolls_the_prior_and_decodes():
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny")).eval()
    frames, actions = torch.rand(2, 6, 3, 144, 160), torch.randint(0, 8, (2, 6))
    out = imagination.open_loop(wm, frames, actions, context=2, horizon=4)
    assert out["pred"].shape == (2, 4, 3, 144, 160) and out["recon"].shape == (2, 2, 3, 144, 160)
    # the same thing by hand: the prior from the last context state with actions a_1..a_4
    ctx = imagination.observe(wm, frames[:, :2], actions[:, :2])
    again = imagination.imagine(wm, imagination.last_state(ctx), actions[:, 1:5])
    torch.testing.assert_close(again["feat"], out["imagined"]["feat"])
    actor = __import__("models").Actor(wm.cfg)
    rollout = imagination.imagine_with_policy(wm, actor, imagination.last_state(ctx), horizon=3)
    assert rollout["feat"].shape == (2, 4, wm.feat_dim) and rollout["cont"].shape == (2, 3)
    rollout["log_probs"].sum().backward()
    assert any(p.grad is not None for p in actor.parameters())


def test_futures_are_prior_samples_fed_back_and_their_median_is_per_coordinate():
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("tiny")).eval()
    cfg = wm.cfg
    h, z = torch.randn(2, cfg.deter), F.one_hot(torch.randint(cfg.classes, (2, cfg.stoch)), cfg.classes).float().flatten(1)
    actions = torch.randint(0, 8, (2, 5))
    many = imagination.futures(wm, (h, z), actions, 16)
    assert many.shape == (2, 16, 5, wm.feat_dim)
    latents = many[..., cfg.deter:].reshape(2, 16, 5, cfg.stoch, cfg.classes)
    assert torch.equal(latents.sum(-1), torch.ones(2, 16, 5, cfg.stoch))  # one-hot samples
    # the first h follows from the start state and action alone; later ones from each future's own samples
    first = wm.rssm.deter_step(h, z, actions[:, 0])
    torch.testing.assert_close(many[:, :, 0, :cfg.deter], first.unsqueeze(1).expand(2, 16, -1))
    assert (many[:, :, 0, cfg.deter:] != many[:, :1, 0, cfg.deter:]).any()  # the draws differ
    assert (many[:, :, -1, :cfg.deter] != many[:, :1, -1, :cfg.deter]).any()
    for b in range(2):  # each future is the prior loop fed its own samples: replayed step by step from them
        for n in (0, 15):
            hh, zz = h[b:b + 1], z[b:b + 1]
            for t in range(5):
                hh = wm.rssm.deter_step(hh, zz, actions[b:b + 1, t])
                zz = many[b:b + 1, n, t, cfg.deter:]
                torch.testing.assert_close(hh[0], many[b, n, t, :cfg.deter])
    # one guess from many: each coordinate's median, not a place any single future reads
    median_place_error = load_script("evaluate_rssm").median_place_error
    read_x = torch.tensor([[[1.0], [9.0], [4.0]]])  # (B=1, N=3, K=1)
    read_y = torch.tensor([[[7.0], [2.0], [3.0]]])
    assert median_place_error(read_x, read_y, torch.tensor([[4.0]]), torch.tensor([[3.0]])).tolist() == [[0.0]]
    assert median_place_error(read_x, read_y, torch.tensor([[6.0]]), torch.tensor([[1.0]])).tolist() == [[4.0]]


@pytest.mark.parametrize("preset, keep_map", [("default", False), ("global", False), ("tiny", False), ("global", True)])
def test_reprojected_imagination_feeds_back_the_posterior_of_its_own_decoded_frame(preset, keep_map):
    """Each step's latent is the posterior of the model's own most likely frame; with keep_map, the prior's latent
    where the place heads read another map from it (the global preset has place heads; keep_map needs them on the
    features, which local_detached, the default's, does not allow)."""
    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset(preset, **({"place_input": "features"} if keep_map else {}))).eval()
    if wm.tiles is not None:
        wm.tiles.size.fill_(wm.cfg.tile_vocab)  # an unfitted codebook: ids are all the encoder reads here
    rssm, B, H = wm.rssm, 16 if keep_map else 2, 3 if keep_map else 4
    h, z = torch.randn(B, wm.cfg.deter), rssm.sample(rssm.log_probs(torch.randn(B, wm.cfg.stoch * wm.cfg.classes)), False)
    actions = torch.randint(0, 8, (B, H))
    out = imagination.imagine(wm, (h, z), actions, reproject=True, keep_map=keep_map)
    kept = taken = 0
    with torch.inference_mode():  # by hand: prior step, the most likely frame, the posterior of that frame
        for t in range(H):
            h, prior_z, _ = rssm.img_step(h, z, actions[:, t], sample=False)
            feat = torch.cat([h, prior_z], -1).unsqueeze(1)
            if wm.tiles is not None:
                embed = wm.encoder(imagination.decode(wm, feat, tile_ids=True)[1].flatten(0, 1)).view(B, -1)
            else:
                embed = wm.embed(imagination.decode(wm, feat))[:, 0]
            z = rssm.sample(rssm.posterior(h, rssm.post_embed_in(embed)), False)
            if keep_map:
                maps = [wm.place_head(torch.cat([h, latent], -1))["map_ids"].argmax(-1) for latent in (prior_z, z)]
                same = maps[0] == maps[1]
                kept += int((~same).sum())
                taken += int((same & (z != prior_z).any(-1)).sum())
                z = torch.where(same[:, None], z, prior_z)
            torch.testing.assert_close(out["h"][:, t], h)
            assert torch.equal(out["z"][:, t], z)
    plain = imagination.imagine(wm, (out["h"][:, 0], out["z"][:, 0]), actions[:, 1:])
    assert not torch.equal(plain["z"], out["z"][:, 1:])  # the posterior's latents, not the prior's
    if keep_map:
        assert kept > 0 and taken > 0  # both branches ran
        tiny = WorldModel(RSSMConfig.from_preset("tiny")).eval()
        with pytest.raises(ValueError, match="place heads"):
            imagination.imagine(tiny, tiny.rssm.initial(1), actions[:1], reproject=True, keep_map=True)
        on_h = WorldModel(RSSMConfig.from_preset("default")).eval()  # its heads read h alone: nothing to compare
        with pytest.raises(ValueError, match="place_input"):
            imagination.imagine(on_h, on_h.rssm.initial(1), actions[:1], reproject=True, keep_map=True)
        with pytest.raises(ValueError, match="reproject=True"):
            imagination.imagine(wm, (h, z), actions, keep_map=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("preset, overrides, tie", [
    ("default", {}, False), ("default", {}, True), ("global", {}, False), ("global", {"gru_blocks": 1}, False),
    ("global", {"prior_layers": 0}, False), ("global", {"prior_layers": 2}, False),
    ("pixels", {"gru_blocks": 1}, False), ("faithful", {}, False), ("tiny", {}, False),
    ("global", {"local_latents": True, "stoch": 122}, False)])
def test_greedy_rollout_equals_the_plain_prior_loop(preset, overrides, tie, fused):
    """RSSM.greedy_rollout, in fused.cpp's loop (every preset but faithful) and in torch's, against
    img_step in a loop."""
    import fused

    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset(preset, **overrides)).eval()
    if tie:  # every class of every latent ties: the most likely is the first, as argmax says
        torch.nn.init.zeros_(wm.rssm.prior_net[-1].weight), torch.nn.init.zeros_(wm.rssm.prior_net[-1].bias)
    h, z = torch.randn(5, wm.cfg.deter), torch.rand(5, wm.cfg.stoch * wm.cfg.classes)  # a soft start z
    actions = torch.randint(0, 8, (5, 7))
    with torch.inference_mode():
        assert fused.supported(wm.rssm, h) == (preset != "faithful")  # built here, or this fails
    with contextlib.nullcontext() if fused else fused.off():
        fast = imagination.imagine(wm, (h, z), actions)
    hs, zs = [], []
    with torch.inference_mode():
        for t in range(actions.shape[1]):
            h, z, _ = wm.rssm.img_step(h, z, actions[:, t], sample=False)
            hs.append(h), zs.append(z)
    torch.testing.assert_close(fast["h"], torch.stack(hs, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(fast["z"], torch.stack(zs, 1))


def test_fused_rollout_equals_torch_loop_over_tiles_starts_threads_and_new_weights():
    """fused.cpp on a batch of two whole tiles (the prior's products through oneDNN) and a partial one, from a
    soft start z (a product), a one-hot one and zeros (sums of table rows), on 1 and 2 threads; after an in-place
    change of the weights it reads the new ones (its prepared copies are remade); an action out of range is refused."""
    import fused

    torch.manual_seed(0)
    wm = WorldModel(RSSMConfig.from_preset("default")).eval()
    cfg, batch = wm.cfg, 2 * fused.TILE + 44
    soft = torch.rand(batch, cfg.stoch * cfg.classes)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, cfg.classes, (batch, cfg.stoch)), cfg.classes).flatten(1)
    h, actions = torch.randn(batch, cfg.deter), torch.randint(0, 8, (batch, 6))
    threads = torch.get_num_threads()

    def both(z):
        """The two rollouts agree to float tolerance: the same classes and close states, but where two classes'
        logits in the torch loop tie to 1e-5 (either may win after rounding; that row's rollouts part there)."""
        with torch.inference_mode():
            fast = wm.rssm.greedy_rollout(h, z.float(), actions)
            with fused.off():
                plain = wm.rssm.greedy_rollout(h, z.float(), actions)
            classes = [x[..., cfg.deter:].view(batch, -1, cfg.stoch, cfg.classes).argmax(-1) for x in (fast, plain)]
            differ = (classes[0] != classes[1]).any(-1)  # (B, H)
            parted = torch.where(differ.any(1), differ.float().argmax(1), actions.shape[1])  # each row's first step
            for row in differ.any(1).nonzero().flatten().tolist():
                step = parted[row].item()
                logits = wm.rssm.prior_net(plain[row, step, :cfg.deter]).view(cfg.stoch, cfg.classes)
                picked = [c[row, step] for c in classes]
                gap = (logits.gather(1, picked[0][:, None]) - logits.gather(1, picked[1][:, None])).abs()
                assert gap.max() < 1e-5, (row, step, gap.max())
        assert (parted < actions.shape[1]).float().mean() < 0.01  # ties are rare
        same = torch.arange(actions.shape[1]) < parted[:, None]  # (B, H): the steps before a row parted
        torch.testing.assert_close(fast[same][:, :cfg.deter], plain[same][:, :cfg.deter], rtol=1e-5, atol=1e-5)
        assert torch.equal(fast[same][:, cfg.deter:], plain[same][:, cfg.deter:])
        return fast

    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for z in (soft, one_hot, torch.zeros_like(soft)):
                both(z)
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the input table"):
        wm.rssm.greedy_rollout(h, soft, actions + cfg.num_actions)
    before = both(one_hot)
    with torch.no_grad():
        wm.rssm.prior_net[-1].weight.mul_(-1.0)  # in place: the parameter's version moves on
    assert not torch.equal(both(one_hot)[..., cfg.deter:], before[..., cfg.deter:])


def test_fused_kernels_that_cannot_be_built_warn_once_and_leave_torchs_ops():
    """A build the compiler refuses (here: a flag it does not know) is None and one warning line quoting it."""
    import fused

    with pytest.warns(UserWarning, match="fused.cpp not built .*no-such-flag.*torch's ops"):
        assert fused.build(("-fno-such-flag",)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [512, 37])  # whole vectors of 16, and a tail
def test_fused_cross_entropy_equals_torchs_loss_and_gradient(dtype, vocab):
    """fused.cross_entropy against F.cross_entropy in float32 (what autocast computes for bfloat16 logits): the
    same losses, the same gradient for any upstream (rounded once to the logits' type); none made without grad;
    a target out of range refused; the backward once only."""
    import fused

    torch.manual_seed(0)
    logits = (4 * torch.randn(1000, vocab)).to(dtype).requires_grad_()
    target, upstream = torch.randint(0, vocab, (1000,)), torch.rand(1000)
    mine = fused.cross_entropy(logits, target)
    assert mine.dtype == torch.float32 and type(mine.grad_fn).__name__ == "_CrossEntropyBackward"  # built, or this fails
    mine.backward(upstream)
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits, target, reduction="none")
    ref.backward(upstream)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert logits.grad.dtype == dtype
    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)  # bf16: 8 bits
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, **tolerance)
    with torch.no_grad():
        torch.testing.assert_close(fused.cross_entropy(logits, target), ref.detach(), rtol=1e-5, atol=1e-5)
        with fused.off():
            assert torch.equal(fused.cross_entropy(logits.float(), target), F.cross_entropy(
                logits.float(), target, reduction="none"))
    with pytest.raises(RuntimeError, match="outside"):
        fused.cross_entropy(logits, target + vocab)
    twice = fused.cross_entropy(logits, target).sum()
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="used already"):
        twice.backward()


# --- tile tokens ----------------------------------------------------------------------------
def tiles_config(**overrides) -> RSSMConfig:
    return RSSMConfig.from_preset("tiny", frame_model="tiles", conv_channels=(8, 16), conv_strides=(8, 2),
                                  tile_vocab=64, **overrides)


def test_tile_codebook_is_exact_on_cartridge_frames_and_nearest_outside(data_dir):
    from dataset import PokemonDataset, frames_to_float
    from tiles import TileCodebook

    obs = PokemonDataset(data_dir, seq_len=1).obs
    book = TileCodebook(4096, (144, 160))
    stats = book.fit(obs[:400])
    assert stats["covered"] == 1.0 and stats["kept"] == stats["distinct"] < 4096
    frames = frames_to_float(torch.from_numpy(obs[400:460]), "cpu")  # (N, 3, H, W), unseen frames
    ids = book.tokenize(frames)
    assert ids.shape == (60, 18, 20)
    seen = book.tokenize(frames_to_float(torch.from_numpy(obs[:60]), "cpu"))
    assert torch.equal(book.render(seen), frames_to_float(torch.from_numpy(obs[:60]), "cpu"))
    small = TileCodebook(8, (144, 160))
    small.fit(obs[:400])
    rendered = small.render(small.tokenize(frames))
    # a tile outside the codebook becomes the entry differing in the fewest pixels, never worse than any entry
    shades, back = small.shades(frames), small.shades(rendered)
    cells = lambda x: x.view(60, 18, 8, 20, 8).permute(0, 1, 3, 2, 4).reshape(-1, 64)
    differ = (cells(shades).unsqueeze(1) != small.tiles.unsqueeze(0)).sum(-1)  # (cells, 8)
    assert torch.equal((cells(shades) != cells(back)).sum(-1), differ.min(1).values)
    sure = torch.nn.functional.one_hot(seen, book.vocab).float() * 100.0  # confident logits (N, gh, gw, V)
    torch.testing.assert_close(book.render_mean(sure), book.render(seen))
    with pytest.raises(ValueError, match="5 colours"):
        noisy = obs[:4].copy()
        noisy[0, 0, 0] = (1, 2, 3)
        TileCodebook(8, (144, 160)).fit(noisy)
    with pytest.raises(RuntimeError, match="codebook is empty"):
        TileCodebook(8, (144, 160)).tokenize(frames)


def test_tile_codebook_keeps_the_most_common_tiles_and_reads_uint8_frames_as_floats(data_dir):
    """fit against a count by hand (the kept tiles the most common, in order; batches and rows do not matter), and
    tokenize_uint8 against tokenize on the float frames, with colours outside the palette (nearest shade) too."""
    from collections import Counter

    from dataset import PokemonDataset, frames_to_float
    from tiles import TileCodebook

    obs = PokemonDataset(data_dir, seq_len=1).obs
    rows = np.arange(0, 400, 2)
    book = TileCodebook(40, (144, 160))
    stats = book.fit(obs, rows=rows, batch=64)
    colours = sorted({tuple(c) for c in obs[rows].reshape(-1, 3).tolist()}, key=sum)
    assert book.palette[:len(colours)].mul(255).round().int().tolist() == [list(c) for c in colours]
    shades = sum(i * (obs[rows] == c).all(-1) for i, c in enumerate(colours)).astype(np.uint8)  # (N, H, W)
    cells = shades.reshape(len(rows), 18, 8, 20, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 64)
    counted = Counter(map(bytes, cells))
    kept = [bytes(t) for t in book.tiles[:int(book.size)].tolist()]
    assert stats["kept"] == 40 and stats["distinct"] == len(counted)
    assert [counted[t] for t in kept] == sorted(counted.values(), reverse=True)[:40]
    assert stats["covered"] == pytest.approx(sum(counted[t] for t in kept) / len(cells))
    again = TileCodebook(40, (144, 160))
    again.fit(obs, rows=rows, batch=1000)
    assert torch.equal(again.tiles, book.tiles) and torch.equal(again.palette, book.palette)

    frames = obs[400:440].copy()
    rng = np.random.default_rng(0)
    frames[rng.integers(0, 40, 200), rng.integers(0, 144, 200), rng.integers(0, 160, 200)] = \
        rng.integers(0, 256, (200, 3))  # colours the codebook never saw, a few per frame
    want = book.tokenize(frames_to_float(torch.from_numpy(frames), "cpu"))
    assert torch.equal(book.tokenize_uint8(frames, batch=16).long(), want)
    seen = obs[rows[:40]]
    assert torch.equal(book.tokenize_uint8(seen).long(), book.tokenize(frames_to_float(torch.from_numpy(seen), "cpu")))


def test_tiles_model_learns_and_its_codebook_survives_a_checkpoint(data_dir, tmp_path):
    from dataset import PokemonDataset, frames_to_float

    torch.manual_seed(0)
    ds = PokemonDataset(data_dir, seq_len=6)
    cfg = tiles_config()
    wm = WorldModel(cfg)
    wm.tiles.fit(ds.obs)
    batch = ds.get_batch(np.arange(0, 48, 6))
    frames = frames_to_float(batch["obs"], "cpu")
    args = frames, batch["actions"], batch["rewards"], batch["continues"]
    optimizer = torch.optim.Adam(wm.parameters(), lr=3e-3)
    first = wm(*args)[1]["recon"].item()
    for _ in range(30):
        loss = wm(*args)[0]
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    assert wm(*args)[1]["recon"].item() < 0.8 * first
    path = checkpoint.save_checkpoint(tmp_path / "wm.pt", kind="rssm", config=cfg.to_dict(), model_state=wm.state_dict())
    rebuilt = checkpoint.build_model(checkpoint.load_checkpoint(path, kind="rssm")).eval()
    assert torch.equal(rebuilt.tiles.tokenize(frames[0]), wm.tiles.tokenize(frames[0]))
    wm.eval()
    feat = imagination.observe(wm, frames, batch["actions"])["feat"]
    assert torch.equal(imagination.decode(rebuilt, feat), imagination.decode(wm, feat))


def test_sprite_changes_undo_the_scroll_and_flag_what_moved():
    from models import aligned_previous, sprite_changes

    torch.manual_seed(0)
    first = torch.randint(0, 50, (18, 20))
    walked = torch.randint(50, 100, (18, 20))  # the camera moved 2 tiles right: new columns at the right edge
    walked[:, :18] = first[:, 2:]
    walked[5, 7] = 100  # and one cell changed against the background
    turned = walked.clone()
    turned[10:12, 4:6] = 101  # a 16x16 character turned; the camera stayed
    ids = torch.stack([first, walked, turned]).unsqueeze(0)  # (1, 3, 18, 20)
    prev = aligned_previous(ids)
    assert (prev[0, 0] == -1).all() and (prev[0, 1, :, 18:] == -1).all()
    assert torch.equal(prev[0, 1, :, :18], first[:, 2:]) and torch.equal(prev[0, 2], walked)
    changed = sprite_changes(ids)[0]
    assert not changed[0].any()
    assert changed[1].sum() == 1 and changed[1, 5, 7]
    assert changed[2].sum() == 4 and changed[2, 10:12, 4:6].all()


def test_recon_change_weight_weighs_the_moved_cells(data_dir):
    from dataset import PokemonDataset
    from models import sprite_changes

    torch.manual_seed(0)
    ds = PokemonDataset(data_dir, seq_len=6)
    models = {w: WorldModel(tiles_config(recon_change_weight=w)).eval() for w in (1.0, 4.0)}
    models[1.0].tiles.fit(ds.obs)
    models[4.0].load_state_dict(models[1.0].state_dict())
    batch = ds.get_batch(np.arange(0, 48, 6))
    ids = models[1.0].tiles.tokenize_uint8(ds.obs)[torch.from_numpy(np.arange(0, 48, 6)[:, None] + np.arange(6))]
    args = dict(frames=None, actions=batch["actions"], rewards=batch["rewards"], continues=batch["continues"],
                tile_ids=ids, frame_metrics=False)
    recon = {w: wm(**args)[1]["recon"] for w, wm in models.items()}  # eval mode: the most likely latents, no noise
    states = models[1.0](**args)[3]
    raw = models[1.0].decode_raw(imagination.features(states))  # (B, T, 18, 20, V)
    cell = torch.nn.functional.cross_entropy(raw.flatten(0, 3), ids.long().flatten(), reduction="none").view(ids.shape)
    moved = sprite_changes(ids.long())
    assert moved.any() and not moved.all()
    torch.testing.assert_close(recon[1.0], cell.sum((-2, -1)).mean())
    torch.testing.assert_close(recon[4.0], torch.where(moved, 4.0 * cell, cell).sum((-2, -1)).mean())
    with pytest.raises(ValueError, match="recon_change_weight"):
        tiles_config(recon_change_weight=-1.0)
    with pytest.raises(ValueError, match="tiles' only"):
        RSSMConfig.from_preset("tiny", recon_change_weight=2.0)


def test_recon_fraction_decodes_a_random_share_of_the_frames_in_training_only(data_dir):
    from dataset import PokemonDataset, world_model_inputs
    from models import sprite_changes

    torch.manual_seed(0)
    ds = PokemonDataset(data_dir, seq_len=6)
    wm = WorldModel(tiles_config(recon_change_weight=4.0, recon_fraction=0.5))
    wm.tiles.fit(ds.obs)
    every = WorldModel(tiles_config(recon_change_weight=4.0))
    every.load_state_dict(wm.state_dict())
    args = world_model_inputs(ds, np.arange(0, 48, 6), "cpu", wm.tiles.tokenize_uint8(ds.obs), with_frames=True)
    ids = args["tile_ids"]  # (B, T, 18, 20)
    seen = []
    wm.decoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    weight = lambda cell, moved: torch.where(moved, 4.0 * cell, cell).sum((-2, -1))  # noqa: E731
    moved = sprite_changes(ids.long()).flatten(0, 1)  # (B*T, 18, 20)
    drawn = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        _, losses, metrics, states = wm.train()(**args)
        feat = imagination.features(states).detach().flatten(0, 1)  # (B*T, F)
        assert seen[-1].shape[0] == 24 and np.isfinite(metrics["psnr"])  # half of the 8 x 6 frames
        rows = [int((feat == row).all(-1).nonzero()[0, 0]) for row in seen[-1]]  # which frames were decoded
        assert len(set(rows)) == 24
        drawn.append(set(rows))
        raw = wm.decoder(feat[rows])
        cell = torch.nn.functional.cross_entropy(raw.flatten(0, 2), ids.long().flatten(0, 1)[rows].flatten(),
                                                 reduction="none").view(24, 18, 20)
        torch.testing.assert_close(losses["recon"], weight(cell, moved[rows]).mean())
    assert drawn[0] != drawn[1]  # drawn afresh each step
    recon = wm.eval()(**args)[1]["recon"]  # validation: every frame, as a model that decodes them all
    assert seen[-1].shape[0] == 48
    torch.testing.assert_close(recon, every.eval()(**args)[1]["recon"])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="recon_fraction"):
            tiles_config(recon_fraction=bad)


def test_conv_kernel_two_keeps_the_grids_and_reads_each_cells_own_block():
    torch.manual_seed(0)
    wide, narrow = WorldModel(tiles_config()), WorldModel(tiles_config(conv_kernel=2))
    conv = [m for m in narrow.encoder.convs if isinstance(m, torch.nn.Conv2d)]
    deconv = [m for m in narrow.decoder.deconvs if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.kernel_size, m.padding) for m in conv + deconv] == [((2, 2), (0, 0))] * 2
    ids = torch.randint(0, 64, (3, 18, 20))
    assert narrow.encoder(ids).shape == wide.encoder(ids).shape
    feat = torch.randn(3, narrow.cfg.deter + narrow.cfg.stoch * narrow.cfg.classes)
    assert narrow.decoder(feat).shape == wide.decoder(feat).shape == (3, 18, 20, 64)
    # one tile changed: kernel 2 moves only the coarse cell above its 2x2 block, kernel 4 its neighbours too
    other = ids.clone()
    other[:, 5, 7] = (other[:, 5, 7] + 1) % 64
    moved = lambda wm: (wm.encoder(ids) - wm.encoder(other)).view(3, -1, 9, 10).abs().sum((0, 1)) > 0  # noqa: E731
    assert moved(narrow).nonzero().tolist() == [[2, 3]]
    assert moved(wide).sum() > 1
    # a pixels model: stride-4 patches stay 4 wide, its stride-2 convs become 2 wide; the same shapes
    pixels = WorldModel(RSSMConfig.from_preset("tiny", conv_kernel=2))
    assert [m.kernel_size for m in pixels.encoder.convs if isinstance(m, torch.nn.Conv2d)] == [(4, 4), (2, 2), (2, 2)]
    frames = torch.rand(2, 3, 144, 160)
    assert pixels.encoder(frames).shape == WorldModel(RSSMConfig.from_preset("tiny")).encoder(frames).shape
    assert pixels.decoder(torch.randn(2, pixels.cfg.deter + pixels.cfg.stoch * pixels.cfg.classes)).shape == frames.shape
    for bad in (0, 3):
        with pytest.raises(ValueError, match="conv_kernel"):
            tiles_config(conv_kernel=bad)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_tiles_model_learns_alike_with_the_fused_cross_entropy(data_dir, precision):
    """A tiles model's training loss and gradients with fused.cpp's cross-entropy and with torch's, in float32 and
    under bfloat16 autocast (as train_rssm.py steps them)."""
    import fused
    from dataset import PokemonDataset, world_model_inputs

    torch.manual_seed(0)
    ds = PokemonDataset(data_dir, seq_len=6)
    wm = WorldModel(tiles_config(recon_change_weight=3.0))  # a weight per cell: each row's upstream differs
    wm.tiles.fit(ds.obs)
    inputs = world_model_inputs(ds, np.arange(0, 48, 6), "cpu", wm.tiles.tokenize_uint8(ds.obs), with_frames=False)
    results = []
    for way in (contextlib.nullcontext(), fused.off()):
        torch.manual_seed(1)  # the same sampling noise
        with way, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            total, losses, _, _ = wm(**inputs, frame_metrics=False)
        wm.zero_grad()
        total.backward()
        results.append((losses["recon"].detach(), [p.grad.clone() for p in wm.parameters() if p.grad is not None]))
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    assert len(fast_grads) == len(plain_grads)
    for a, b in zip(fast_grads, plain_grads):  # bfloat16 (8 bits): the two round the logits' gradient at other points
        assert (a - b).norm() <= (1e-4 if precision == "float32" else 3e-2) * b.norm() + 1e-6


def test_tile_ids_made_once_train_exactly_as_tokenizing_each_batch(data_dir):
    from dataset import PokemonDataset, frames_to_float, world_model_inputs

    torch.manual_seed(0)
    ds = PokemonDataset(data_dir, seq_len=6)
    wm = WorldModel(tiles_config())
    wm.tiles.fit(ds.obs)
    ids = wm.tiles.tokenize_uint8(ds.obs, batch=100)  # several batches, the last one short
    assert ids.dtype == torch.int16 and ids.shape == (len(ds.obs), 18, 20)
    assert torch.equal(ids.long(), wm.tiles.tokenize(frames_to_float(torch.from_numpy(ds.obs), "cpu")))
    starts = np.arange(0, 48, 6)
    inputs = world_model_inputs(ds, starts, "cpu", ids, with_frames=False)
    assert inputs["frames"] is None and inputs["tile_ids"].shape == (8, 6, 18, 20) and "places" not in inputs
    scenes = WorldModel(RSSMConfig.from_preset("tiny", place_scale=1.0, place_scenes=True))
    asked = world_model_inputs(ds, starts, "cpu", ids, with_frames=False, place_keys=scenes.place_keys)["places"]
    assert list(asked) == ["xs", "ys", "map_ids", "facings", "in_battles", "dialog_opens"]  # what the heads read
    assert all(torch.equal(asked[k], ds.get_batch(starts)[k]) for k in asked)
    batch = ds.get_batch(starts)
    frames = frames_to_float(batch["obs"], "cpu")
    grads = []
    for kwargs in ({"frames": frames}, {"frames": None, "tile_ids": inputs["tile_ids"], "frame_metrics": False}):
        torch.manual_seed(1)  # the same sampling noise
        total, _, metrics, _ = wm(actions=batch["actions"], rewards=batch["rewards"], continues=batch["continues"], **kwargs)
        wm.zero_grad()
        total.backward()
        grads.append([p.grad.clone() for p in wm.parameters() if p.grad is not None])
        assert ("psnr" in metrics) == ("tile_ids" not in kwargs) and "kl" in metrics
    assert len(grads[0]) == len(grads[1]) and all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="frame_metrics needs the frames"):
        wm(None, batch["actions"], batch["rewards"], batch["continues"], tile_ids=inputs["tile_ids"])
    with pytest.raises(ValueError, match="reads pixels"):
        WorldModel(RSSMConfig.from_preset("tiny"))(frames, batch["actions"], batch["rewards"], batch["continues"],
                                                  tile_ids=inputs["tile_ids"])


# --- checkpoints --------------------------------------------------------------------------
def test_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = RSSMConfig.from_preset("tiny")
    wm = WorldModel(cfg)
    path = checkpoint.save_checkpoint(tmp_path / "wm.pt", kind="rssm", config=cfg.to_dict(), model_state=wm.state_dict(),
                                      extra={"rng": checkpoint.rng_state()})
    rebuilt = checkpoint.build_model(checkpoint.load_checkpoint(path, kind="rssm"))
    for key, value in wm.state_dict().items():
        assert torch.equal(value, rebuilt.state_dict()[key])
    with pytest.raises(UserError, match="'rssm' checkpoint, but a 'vae'"):
        checkpoint.load_checkpoint(path, kind="vae")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": checkpoint.FORMAT, "kind": "rssm", "obj": __import__("argparse").Namespace(a=1)}, pickled)
    with pytest.raises(UserError, match="pickled Python objects"):
        checkpoint.load_checkpoint(pickled)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint.load_checkpoint(corrupt)
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "missing.pt")
    other = dict(checkpoint.load_checkpoint(path), config=RSSMConfig.from_preset("tiny", deter=48).to_dict())
    with pytest.raises(UserError, match="another architecture.*rssm.cell"):
        checkpoint.build_model(other)


# --- the scripts on real emulator data ----------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(collected_data):
    return collected_data("144x160")


@pytest.fixture(scope="module")
def tiny_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rssm_tiny")
    done = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", out, *TINY_TRAIN, "--epochs", 2,
                      "--steps-per-epoch", 12, "--save-interval", 1, "--checkpoint-every", 5, "--lr", 1e-3)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_train_rssm_lowers_the_loss_and_writes_every_output(tiny_run):
    for name in ("config.json", "metrics.json", "metrics.jsonl", "loss_curves.png", "reconstruction_epoch_001.png",
                 "reconstruction_epoch_002.png", "best_world_model.pt", "world_model_epoch_001.pt",
                 "world_model_epoch_002.pt", "checkpoint_latest.pt"):
        assert (tiny_run / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/total" in r]
    assert steps[-1]["loss/total"] < steps[0]["loss/total"]
    assert all(r["perf/frames_per_s"] > 0 for r in steps)
    epochs = json.loads((tiny_run / "metrics.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert {"loss/train", "loss/val", "loss/val_recon", "loss/val_kl", "loss/val_reward", "eval/psnr"} <= epochs[-1].keys()
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["preset"] == "tiny" and config["run"]["seq_len"] == 8
    latest = checkpoint.load_checkpoint(tiny_run / "checkpoint_latest.pt", kind="rssm")
    assert latest["step"] == 24 and latest["optimizer_state"] is not None and "rng" in latest["extra"]


def test_train_rssm_fits_the_tile_codebook_and_resume_keeps_it(data_dir, tmp_path):
    tiles = ["--set", "frame_model=\"tiles\"", "--set", "conv_channels=[8,16]", "--set", "conv_strides=[8,2]",
             "--set", "tile_vocab=64"]
    first = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY_TRAIN, *tiles,
                       "--epochs", 1, "--steps-per-epoch", 4, "--log-every", 3)  # steps 1, 2, 4 read no frames
    assert first.returncode == 0, first.stderr[-3000:]
    assert "tile codebook:" in first.stdout and "kept the 64 most common" in first.stdout
    assert "tile ids of" in first.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/psnr" in r] == [3]
    assert math.isfinite(records[-1]["loss/train_recon"]) and math.isfinite(records[-1]["loss/train_kl"])
    book = checkpoint.load_checkpoint(tmp_path / "checkpoint_latest.pt")["model_state"]["tiles.tiles"]
    again = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY_TRAIN, "--epochs", 2,
                       "--steps-per-epoch", 4, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tile codebook:" not in again.stdout  # the resumed run keeps the checkpoint's codebook
    wm = checkpoint.build_model(checkpoint.load_checkpoint(tmp_path / "best_world_model.pt"))
    assert wm.cfg.frame_model == "tiles" and torch.equal(wm.state_dict()["tiles.tiles"], book)
    # evaluate_rssm.py counts the posterior's wrong tiles of a tiles model
    done = run_script("evaluate_rssm.py", "--checkpoints", tmp_path / "best_world_model.pt", "--data-dir", data_dir,
                      "--horizon", 4, "--max-sequences", 4, "--probe-windows", 4, "--probe-steps", 5,
                      "--out-dir", tmp_path / "eval", "--threads", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    again = run_script("evaluate_rssm.py", "--checkpoints", tmp_path / "best_world_model.pt", "--data-dir", data_dir,
                       "--horizon", 4, "--max-sequences", 4, "--probe-windows", 4, "--probe-steps", 5,
                       "--out-dir", tmp_path / "eval_reproject", "--threads", 1, "--reproject")
    assert again.returncode == 0, again.stderr[-3000:]
    reprojected = json.loads((tmp_path / "eval_reproject" / "results.json").read_text())
    assert reprojected["reproject"] is True and all(math.isfinite(s["tile_error"]) for s in
                                                    next(iter(reprojected["results"].values()))["steps"])
    for extra in (["--keep-map"], ["--keep-map", "--reproject"]):  # alone; on a model without place heads
        refused = run_script("evaluate_rssm.py", "--checkpoints", tmp_path / "best_world_model.pt", "--data-dir",
                             data_dir, "--out-dir", tmp_path / "eval_keep_map", "--threads", 1, *extra)
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr[-3000:]
        assert ("--reproject" if len(extra) == 1 else "place heads") in refused.stderr
    scored = next(iter(json.loads((tmp_path / "eval" / "results.json").read_text())["results"].values()))
    tiles_row, by_frame = scored["recon_tiles"], scored["posterior_tile_error_by_frame"]
    assert len(by_frame) == 5 and scored["context_tile_error"] == by_frame[0]  # 1 context frame + 4 imagined
    assert scored["posterior_tile_error"] == pytest.approx(sum(by_frame) / 5)
    from dataset import PokemonDataset, evenly, frames_to_float

    ds = PokemonDataset(data_dir, seq_len=5)
    batch = ds.get_batch(evenly(ds.split(0.1, seed=0)[1], 4))
    frames = frames_to_float(batch["obs"], "cpu")
    feat = imagination.observe(wm.eval(), frames, batch["actions"])["feat"]
    recon, ids = imagination.decode(wm, feat, tile_ids=True)
    assert torch.equal(recon, imagination.decode(wm, feat))  # the frames of the same decoder pass
    wrong = (ids != wm.tiles.tokenize(frames.flatten(0, 1)).view(ids.shape)).float()
    assert tiles_row["wrong_per_frame"] == pytest.approx(wrong.sum((-2, -1)).mean().item())
    assert tiles_row["frames_all_right"] == pytest.approx((wrong.sum((-2, -1)) == 0).float().mean().item())
    assert 0 <= tiles_row["wrong_on_changes"] <= 1 and 0 <= tiles_row["stale_of_wrong_changes"] <= 1
    for key in ("frames_at_training_places", "wrong_on_unusual", "usual_of_wrong_unusual"):
        assert 0 <= tiles_row[key] <= 1, key
    assert tiles_row["unusual_per_frame"] >= 0
    assert "wrong tiles per frame" in (tmp_path / "eval" / "results.md").read_text()
    assert "unlike the place's usual one" in (tmp_path / "eval" / "results.md").read_text()


def test_usual_tiles_are_each_places_most_common_tile(data_dir):
    """evaluate_rssm.usual_tiles against a count by hand: per place (map, x, y, battle) of the rows given, each
    cell's most common tile id (a tie to the larger id); places of other rows are not in it."""
    from collections import Counter

    from dataset import PokemonDataset
    from tiles import TileCodebook

    evaluate = load_script("evaluate_rssm")
    ds = PokemonDataset(data_dir, seq_len=4)
    book = TileCodebook(64, ds.resolution)
    book.fit(ds.obs)
    ids = book.tokenize_uint8(ds.obs)
    rows = np.arange(0, len(ds.obs), 3)
    places, usual = evaluate.usual_tiles(ds, rows, ids, 64)
    keys = evaluate.place_keys(ds, rows)
    assert np.array_equal(places, np.unique(keys)) and usual.shape == (len(places), 18 * 20)
    assert len(places) > 5  # the test data walks somewhere
    for index, key in enumerate(places):
        counts = [Counter(column) for column in ids[torch.from_numpy(rows[keys == key])].flatten(1).T.tolist()]
        assert usual[index].tolist() == [max(c, key=lambda t: (c[t], t)) for c in counts]


def test_split_seed_keeps_the_held_out_episodes_of_another_seed(data_dir, tmp_path):
    from dataset import PokemonDataset

    ds = PokemonDataset(data_dir, seq_len=8)
    held_out = {seed: sorted({int(e) for e in ds.segment_ids[ds.split(0.1, seed=seed)[1]]}) for seed in (0, 3)}
    assert held_out[0] != held_out[3]  # the fixture's episodes split differently under the two seeds
    for flags, want in ((["--seed", 3], held_out[3]), (["--seed", 3, "--split-seed", 0], held_out[0])):
        out = tmp_path / "_".join(map(str, flags))
        done = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", out, *TINY_TRAIN, "--epochs", 1,
                          "--steps-per-epoch", 1, *flags)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "config.json").read_text())["val_episodes"] == want, flags


def test_train_rssm_learns_the_places_from_the_logged_ram(data_dir, tmp_path):
    done = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY_TRAIN, "--epochs", 1,
                      "--steps-per-epoch", 10, "--lr", 3e-3, "--set", "place_scale=1.0", "--set", "overshoot=2")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss/place" in r]
    assert len(steps) == 10 and steps[-1]["loss/place"] < steps[0]["loss/place"]
    assert "loss/val_place" in json.loads((tmp_path / "metrics.json").read_text())[-1]
    # evaluate_rssm.py also scores what the model's own heads read from its imagined states
    done = run_script("evaluate_rssm.py", "--checkpoints", tmp_path / "best_world_model.pt", "--labels", "place",
                      "--data-dir", data_dir, "--horizon", 6, "--max-sequences", 4, "--probe-windows", 4,
                      "--probe-steps", 20, "--out-dir", tmp_path / "eval", "--threads", 1, "--futures", 3)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["place"]
    steps = res["steps"]
    assert len(steps) == 6 and all(np.isfinite(s["head_tile_error"]) and s["head_tile_error"] >= 0 for s in steps)
    assert all(np.isfinite(s["head_tile_error_futures"]) and s["head_tile_error_futures"] >= 0 for s in steps)
    assert list(res["by_window_kind_by_reading"]) == ["heads", "probe futures", "heads futures"]
    assert "own place heads" in (tmp_path / "eval" / "results.md").read_text()
    assert "| place | 3 | place heads |" in (tmp_path / "eval" / "results.md").read_text()
    # futures off: none of their fields
    done = run_script("evaluate_rssm.py", "--checkpoints", tmp_path / "best_world_model.pt", "--labels", "place",
                      "--data-dir", data_dir, "--horizon", 2, "--max-sequences", 2, "--probe-windows", 2,
                      "--probe-steps", 2, "--out-dir", tmp_path / "eval0", "--threads", 1, "--futures", 0)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "eval0" / "results.json").read_text())["results"]["place"]
    assert "tile_error_futures" not in res["steps"][0] and list(res["by_window_kind_by_reading"]) == ["heads"]


def test_train_rssm_in_bfloat16_learns_and_keeps_float32_weights(data_dir, tmp_path):
    """bfloat16 for the first 60% of the 10 steps, then float32 (float32_tail=0.4); weights always float32."""
    done = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY_TRAIN, "--epochs", 1,
                      "--steps-per-epoch", 10, "--lr", 3e-3, "--set", "train_precision=bfloat16",
                      "--set", "float32_tail=0.4")
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss/total" in r]
    assert len(steps) == 10 and steps[-1]["loss/total"] < steps[0]["loss/total"]
    assert [r["train/bfloat16"] for r in steps] == [1] * 6 + [0] * 4
    assert json.loads((tmp_path / "config.json").read_text())["train_precision"] == "bfloat16"
    saved = checkpoint.load_checkpoint(tmp_path / "best_world_model.pt", kind="rssm")
    assert saved["config"]["train_precision"] == "bfloat16" and saved["config"]["float32_tail"] == 0.4
    assert all(v.dtype == torch.float32 for v in saved["model_state"].values() if v.is_floating_point())
    with pytest.raises(ValueError, match="train_precision"):
        RSSMConfig.from_preset("tiny", train_precision="float16")
    with pytest.raises(ValueError, match="float32_tail"):
        RSSMConfig.from_preset("tiny", float32_tail=0.5)  # needs train_precision bfloat16 or auto


def test_auto_train_precision_is_bfloat16_only_where_the_cpu_computes_it_natively():
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert checkpoint.train_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert checkpoint.train_precision("auto", torch.device("cpu")) == checkpoint.train_precision("auto", "cpu")
    for fixed in ("float32", "bfloat16"):
        assert checkpoint.train_precision(fixed, "cpu") == fixed
    assert RSSMConfig.from_preset("tiny", train_precision="auto", float32_tail=0.1).float32_tail == 0.1


def test_latent_distributions_and_twohot_loss_stay_float32_under_bfloat16_autocast():
    """Under train_precision=bfloat16 the matrix products run in bfloat16, but the categorical log-probabilities
    (whose small differences are the KL terms) and the two-hot log-softmax are computed in float32: the same
    values as float32 from the same bfloat16 logits, where bfloat16 log-softmax would round them."""
    import models

    cfg = RSSMConfig.from_preset("tiny")
    rssm = RSSM(cfg, 16)
    torch.manual_seed(0)
    logits = (torch.randn(64, cfg.stoch * cfg.classes) * 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = rssm.log_probs(logits)
        h, z, prior_logp = rssm.img_step(*rssm.initial(4), torch.arange(4), sample=True)
        bins = twohot_bins(31, 20.0)
        loss = models.twohot_loss(torch.randn(64, 31).bfloat16(), torch.randn(64), bins)
    assert logp.dtype == prior_logp.dtype == z.dtype == h.dtype == loss.dtype == torch.float32
    assert torch.equal(logp, rssm.log_probs(logits.float()))
    rounded = logits.view(64, cfg.stoch, cfg.classes).log_softmax(-1)  # what bfloat16 would have given
    assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), logits.float().view_as(rounded).log_softmax(-1))


def test_train_rssm_stops_cleanly_on_a_non_finite_loss(data_dir, tmp_path):
    done = run_script("train_rssm.py", "--data-dir", data_dir, "--out-dir", tmp_path, *TINY_TRAIN, "--epochs", 1,
                      "--steps-per-epoch", 3, "--set", "recon_scale=NaN")
    assert done.returncode == 2
    assert "non-finite loss at step 1" in done.stderr and "total=nan" in done.stderr


def test_train_rssm_trains_on_extra_folders_and_holds_out_the_same_windows(data_dir, tmp_path):
    from dataset import PokemonDataset, chunk_name, list_chunks

    extra = tmp_path / "more"
    extra.mkdir()
    (extra / chunk_name(1)).write_bytes(list_chunks(data_dir)[0].read_bytes())  # one more chunk's episodes
    train, val = PokemonDataset(data_dir, seq_len=8).split(0.1, seed=0)
    more = len(PokemonDataset(extra, seq_len=8))
    done = run_script("train_rssm.py", "--data-dir", data_dir, "--extra-data-dir", extra, "--out-dir", tmp_path / "run",
                      *TINY_TRAIN, "--epochs", 1, "--steps-per-epoch", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"data: {len(train) + more} training windows of 8 frames ({more} from --extra-data-dir), {len(val)} held out" \
        in done.stdout
    missing = run_script("train_rssm.py", "--data-dir", data_dir, "--extra-data-dir", tmp_path / "nowhere",
                         "--out-dir", tmp_path / "run2", *TINY_TRAIN)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1] == f"error: data folder {tmp_path / 'nowhere'} does not exist; " \
        "collect data with scripts/collect_data.py"


def test_ddp_two_processes_keep_identical_weights(data_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "scripts" / "train_rssm.py"), "--data-dir", str(data_dir), "--out-dir", str(tmp_path),
               *TINY_TRAIN, "--epochs", 1, "--steps-per-epoch", 6]
    done = subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ddp = [r for r in records if "ddp/max_weight_diff" in r]
    assert ddp and ddp[-1]["ddp/world_size"] == 2 and ddp[-1]["ddp/max_weight_diff"] == 0.0
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint_latest.pt")["step"] == 6


def test_battle_and_map_change_windows_are_drawn_repeats_times_and_the_lr_schedule_anneals(data_dir):
    from dataset import PokemonDataset

    train_rssm = load_script("train_rssm")
    ds = PokemonDataset(data_dir, seq_len=6)
    starts = ds.split(0.2, seed=0)[0]
    ds.arrays["in_battles"] = np.zeros_like(ds.arrays["in_battles"])  # a battle frame at one row only
    row = int(starts[len(starts) // 2]) + 2
    ds.arrays["in_battles"][row] = True
    covering = starts[(starts <= row) & (row < starts + 6)]
    assert 1 <= len(covering) <= 6
    drawn = train_rssm.repeat_event_windows(ds, starts, 3)
    values, counts = np.unique(drawn, return_counts=True)
    assert np.array_equal(values, np.unique(starts)) and len(drawn) == len(starts) + 2 * len(covering)
    assert set(values[counts == 3].tolist()) == set(covering.tolist()) and set(counts.tolist()) == {1, 3}
    assert train_rssm.repeat_event_windows(ds, starts, 1) is starts
    # a map change between two rows: the windows holding both rows drawn map_change_repeats times (a battle's 3 wins)
    ds.arrays["map_ids"] = np.zeros_like(ds.arrays["map_ids"])
    later = int(starts[len(starts) // 4]) + 3
    ds.arrays["map_ids"][later:] = 1  # the change between rows later - 1 and later
    both = starts[(starts <= later - 1) & (later < starts + 6)]
    assert 1 <= len(both) <= 5 and not set(both.tolist()) & set(covering.tolist())
    values, counts = np.unique(train_rssm.repeat_event_windows(ds, starts, 3, 2), return_counts=True)
    assert set(values[counts == 2].tolist()) == set(both.tolist()) and set(values[counts == 3].tolist()) == set(covering.tolist())
    assert set(counts.tolist()) == {1, 2, 3}

    cfg = RSSMConfig.from_preset("tiny", lr_schedule="cosine", lr_final=0.1)
    lrs = [train_rssm.scheduled_lr(cfg, 1e-3, p) for p in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(5.5e-4) and lrs[3] == lrs[4] == pytest.approx(1e-4)
    assert lrs == sorted(lrs, reverse=True)
    assert train_rssm.scheduled_lr(RSSMConfig.from_preset("tiny"), 1e-3, 0.7) == 1e-3
    for bad in ({"lr_schedule": "linear"}, {"lr_final": 1.5}, {"battle_repeats": 0}, {"map_change_repeats": 0}):
        with pytest.raises(ValueError):
            RSSMConfig.from_preset("tiny", **bad)


def test_weight_decay_shrinks_matrices_and_kernels_only():
    """weight_decay > 0: AdamW's decoupled decay. With zero gradients Adam's step is 0, so one step scales each
    matrix and kernel by (1 - lr * decay) and leaves biases and norm gains; weight_decay 0 is plain Adam."""
    train_rssm = load_script("train_rssm")
    assert type(train_rssm.make_optimizer(WorldModel(RSSMConfig.from_preset("tiny")), 1e-3)) is torch.optim.Adam
    wm = WorldModel(RSSMConfig.from_preset("tiny", weight_decay=0.5))
    optimizer = train_rssm.make_optimizer(wm, 0.1)
    before = {name: p.detach().clone() for name, p in wm.named_parameters()}
    for p in wm.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in wm.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (0.95 if p.ndim >= 2 else 1.0), msg=name)
    assert any(p.ndim >= 2 for p in wm.parameters()) and any(p.ndim < 2 for p in wm.parameters())
    with pytest.raises(ValueError, match="weight_decay"):
        RSSMConfig.from_preset("tiny", weight_decay=-1.0)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            RSSMConfig.from_preset("tiny", ema_decay=bad)


def test_kill_and_resume_equals_an_uninterrupted_run(data_dir, tmp_path):
    """... with a weight average kept (ema_decay), resumed too, and what the saved models hold."""
    args = ["--data-dir", data_dir, *TINY_TRAIN, "--epochs", 2, "--steps-per-epoch", 8, "--checkpoint-every", 2,
            "--set", "lr_schedule=cosine", "--set", "ema_decay=0.5", "--save-interval", 1]  # cosine: follows the step
    script = [sys.executable, str(REPO / "scripts" / "train_rssm.py"), *map(str, args), "--out-dir"]
    straight = subprocess.Popen([*script, str(tmp_path / "straight")], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # runs alongside the one we kill
    killed_dir = tmp_path / "killed"  # also validates every 3 batches: that must not change the training
    process = subprocess.Popen([*script, str(killed_dir), "--val-every", "3"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    latest, deadline = killed_dir / "checkpoint_latest.pt", time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if latest.exists() and checkpoint.load_checkpoint(latest)["step"] >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.load_checkpoint(latest)["step"]
    assert killed_at < 16
    resumed = run_script("train_rssm.py", *args, "--out-dir", killed_dir, "--resume", "--val-every", 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=120) == 0, straight.stderr.read()[-3000:]

    a = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoint_latest.pt")
    b = checkpoint.load_checkpoint(latest)
    assert a["step"] == b["step"] == 16
    for key, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    names = [name for name, _ in checkpoint.build_model(a).named_parameters()]
    assert len(a["extra"]["weight_average"]) == len(names)
    saved = checkpoint.load_checkpoint(tmp_path / "straight" / "world_model_epoch_002.pt")["model_state"]
    for name, mine, theirs in zip(names, a["extra"]["weight_average"], b["extra"]["weight_average"]):
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(saved[name], mine), name  # the saved model is the average, not the weights trained
    assert any(not torch.equal(saved[n], a["model_state"][n]) for n in names)
    records = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps), "records written after the checkpoint were kept on resume"
    lrs = [r["train/lr"] for r in records if "train/lr" in r]
    assert len(lrs) == 16 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.2 * lrs[0]
    during = [r for r in records if "eval/psnr_during" in r]
    assert [r["step"] for r in during][-3:] == [9, 12, 15] and all(r["perf/train_s"] > 0 for r in during)


def test_evaluate_rssm_writes_k_finite_rows_for_two_checkpoints(tiny_run, data_dir, tmp_path):
    done = run_script("evaluate_rssm.py", "--checkpoints", tiny_run / "best_world_model.pt",
                      tiny_run / "world_model_epoch_001.pt", "--labels", "best", "epoch1", "--data-dir", data_dir,
                      "--horizon", 6, "--max-sequences", 4, "--probe-windows", 4, "--probe-steps", 20,
                      "--out-dir", tmp_path, "--threads", 1, "--futures", 5)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results) == ["best", "epoch1"]
    for res in results.values():  # one guess from 5 futures, by the probe (this model has no place heads)
        assert res["futures"] == 5 and list(res["by_window_kind_by_reading"]) == ["probe futures"]
        futures = [s["tile_error_futures"] for s in res["steps"]]
        assert all(np.isfinite(futures)) and min(futures) >= 0 and "head_tile_error_futures" not in res["steps"][0]
        assert res["by_window_kind_by_reading"]["probe futures"]["quiet"]["windows"] == res["quiet_sequences"]
    assert "median of the places read" in (tmp_path / "results.md").read_text()
    for res in results.values():
        assert [s["k"] for s in res["steps"]] == [1, 2, 3, 4, 5, 6]
        values = [v for s in res["steps"] for v in (s["tile_error"], s["map_acc"], s["psnr"])]
        assert all(np.isfinite(values)) and np.isfinite(res["recon_psnr"])
        for s in res["steps"]:  # the spread over the 4 windows: a median of 4 lies between the two middle ones
            assert 0 <= s["within_1_tile"] <= 1 and 0 <= s["tile_error_median"] <= 4 * s["tile_error"]
        assert res["recon_tiles"] is None  # a pixels model has no tiles to count
    assert "| 6 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "drift.png").stat().st_size > 0
    # the no-move baseline: |position at k - position at the context frame|, over the same windows
    from dataset import PokemonDataset

    ds = PokemonDataset(data_dir, seq_len=7)
    batch = ds.get_batch(load_script("evaluate_rssm").evenly(ds.split(0.1, seed=0)[1], 4))
    stay = ((batch["xs"][:, 1:] - batch["xs"][:, :1]).abs() + (batch["ys"][:, 1:] - batch["ys"][:, :1]).abs()).float()
    battle = int(batch["in_battles"].sum())
    text = int((batch["dialog_opens"] & ~batch["in_battles"]).sum())
    for res in results.values():
        assert [s["stay_tile_error"] for s in res["steps"]] == pytest.approx(stay.mean(0).tolist())
        scenes = res["recon_by_scene"]  # every frame in one scene, by its RAM; the shares add up
        assert [scenes[k]["frames"] for k in ("overworld", "text box", "battle")] == [28 - text - battle, text, battle]
        assert sum(v["error_share"] for v in scenes.values()) == pytest.approx(1.0, abs=1e-4)
    # quiet windows: no battle, text box or map change in any frame; their no-move baseline
    quiet = ~(batch["in_battles"].any(1) | batch["dialog_opens"].any(1) | (batch["map_ids"] != batch["map_ids"][:, :1]).any(1))
    assert 0 < int(quiet.sum()) < 4  # the fixture's windows have both kinds
    for res in results.values():
        assert res["quiet_sequences"] == int(quiet.sum())
        assert [s["quiet_stay_tile_error"] for s in res["steps"]] == pytest.approx(stay[quiet].mean(0).tolist())
        assert all(np.isfinite(s["quiet_tile_error"]) for s in res["steps"])
    assert "quiet windows" in (tmp_path / "results.md").read_text()
    # by window kind: each window once; the kinds' errors and shares add up to the whole; quiet as above
    evaluate = load_script("evaluate_rssm")
    kinds = evaluate.window_kinds(batch, 1)
    assert torch.equal(kinds == evaluate.WINDOW_KINDS.index("quiet"), quiet)
    assert torch.equal(kinds == 0, batch["in_battles"][:, 0].bool())
    for res in results.values():
        split = res["by_window_kind"]
        assert sum(v["windows"] for v in split.values()) == 4
        assert split["quiet"]["tile_error"] == pytest.approx([s["quiet_tile_error"] for s in res["steps"]])
        for k, s in enumerate(res["steps"]):
            assert sum(v["error_share"][k] for v in split.values()) == pytest.approx(1.0, abs=1e-4) or s["tile_error"] == 0
            assert sum(v["windows"] * v["tile_error"][k] for v in split.values() if v["windows"]) == pytest.approx(
                4 * s["tile_error"], abs=1e-4)
    assert "all but the first kind" in (tmp_path / "results.md").read_text()
    # a made-up batch of five windows, one of each kind, the first in battle from its context frame on
    made = {"in_battles": torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]),
            "dialog_opens": torch.tensor([[0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]),
            "map_ids": torch.tensor([[1, 1, 1], [1, 1, 1], [1, 2, 2], [3, 3, 3], [3, 3, 3]])}
    assert evaluate.window_kinds(made, 1).tolist() == [0, 1, 2, 3, 4]
    assert evaluate.window_kinds(made, 2).tolist() == [0, 0, 2, 3, 4]  # the second window's context ends in battle


def test_probe_latent_noise_redraws_whole_latents_and_leaves_h_alone(tiny_run, data_dir, tmp_path):
    randomize = load_script("evaluate_rssm").randomize_latents
    deter, stoch, classes, n = 5, 64, 4, 2000
    h = torch.randn(n, deter)
    z = torch.nn.functional.one_hot(torch.randint(classes, (n, stoch)), classes).float()
    feat = torch.cat([h, z.flatten(1)], -1)
    out = randomize(feat, deter, stoch, classes, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :deter], h)
    new = out[:, deter:].view(n, stoch, classes)
    assert torch.equal(new.sum(-1), torch.ones(n, stoch)) and set(new.unique().tolist()) == {0.0, 1.0}
    changed = (new != z).any(-1).float().mean().item()  # redrawn with p 0.3, and a redraw differs 3 times in 4
    assert changed == pytest.approx(0.3 * (1 - 1 / classes), abs=0.01)
    assert torch.equal(randomize(feat, deter, stoch, classes, 0.0, torch.Generator()), feat)
    done = run_script("evaluate_rssm.py", "--checkpoints", tiny_run / "best_world_model.pt", "--data-dir", data_dir,
                      "--horizon", 3, "--max-sequences", 4, "--probe-windows", 4, "--probe-steps", 5,
                      "--probe-latent-noise", 0.1, "--out-dir", tmp_path, "--threads", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["probe_latent_noise"] == 0.1
    bad = run_script("evaluate_rssm.py", "--checkpoints", tiny_run / "best_world_model.pt", "--data-dir", data_dir,
                     "--probe-latent-noise", 1.5, "--out-dir", tmp_path)
    assert bad.returncode == 2 and "--probe-latent-noise" in bad.stderr
    bad = run_script("evaluate_rssm.py", "--checkpoints", tiny_run / "best_world_model.pt", "--data-dir", data_dir,
                     "--futures", -1, "--out-dir", tmp_path)
    assert bad.returncode == 2 and "--futures" in bad.stderr


def test_evaluate_rssm_scores_the_training_episodes_when_asked(tiny_run, data_dir, tmp_path):
    done = run_script("evaluate_rssm.py", "--checkpoints", tiny_run / "best_world_model.pt", "--data-dir", data_dir,
                      "--episodes", "train", "--horizon", 4, "--max-sequences", 4, "--probe-windows", 4,
                      "--probe-steps", 5, "--out-dir", tmp_path, "--threads", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["episodes"] == "train" and "on training episodes" in (tmp_path / "results.md").read_text()
    from dataset import PokemonDataset, evenly

    ds = PokemonDataset(data_dir, seq_len=5)

    def no_move(starts):  # the no-move baseline of 4 windows picked as evaluate_rssm.py picks them
        batch = ds.get_batch(evenly(starts, 4))
        return ((batch["xs"][:, 1:] - batch["xs"][:, :1]).abs()
                + (batch["ys"][:, 1:] - batch["ys"][:, :1]).abs()).float().mean(0).tolist()

    train_starts, val_starts = ds.split(0.1, seed=0)
    assert no_move(train_starts) != pytest.approx(no_move(val_starts))  # the two sides can be told apart here
    steps = next(iter(saved["results"].values()))["steps"]
    assert [s["stay_tile_error"] for s in steps] == pytest.approx(no_move(train_starts))


def test_demo_video_is_playable_with_the_expected_frame_count(tiny_run, cartridge_rom, start_state_file, tmp_path):
    import imageio.v3 as iio

    video, gif = tmp_path / "demo.mp4", tmp_path / "demo.gif"
    done = run_script("generate_demo_video_v2.py", "--rom", cartridge_rom, "--checkpoint", tiny_run / "best_world_model.pt",
                      "--save-state", start_state_file, "--out-video", video, "--gif", gif, "--max-steps", 5,
                      "--context", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    frames = iio.imread(video)
    assert frames.shape == (6, 22 + 288, 3 * 320, 3)  # a label bar over each 2x-scaled panel
    assert len(iio.imread(gif)) == 6
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_predictability_replays_the_logged_path_and_refuses_another_start(cartridge_rom, start_state_file, tmp_path):
    """scripts/predictability.py: the game's own floor under the drift, by replay in the emulator."""
    data = tmp_path / "data"  # episodes of 100 in chunks of 200: every episode replayable from the start
    done = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", data, "--total-steps", 400,
                      "--episode-length", 100, "--save-interval", 200, "--seed", 1, "--policy", "explore",
                      "--save-state", start_state_file)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_script("predictability.py", "--rom", cartridge_rom, "--save-state", start_state_file, "--data-dir", data,
                      "--val-split", 0.5, "--horizon", 12, "--max-sequences", 6, "--draws", 3, "--out-dir", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["windows"] == 6 and len(saved["steps"]) == 12
    from dataset import PokemonDataset, evenly

    ds = PokemonDataset(data, seq_len=13)  # the no-move baseline of the windows evaluate_rssm.py would score
    batch = ds.get_batch(evenly(ds.split(0.5, seed=0)[1], 6))
    stay = ((batch["xs"][:, 1:] - batch["xs"][:, :1]).abs() + (batch["ys"][:, 1:] - batch["ys"][:, :1]).abs()).float()
    assert [s["stay"] for s in saved["steps"]] == pytest.approx(stay.mean(0).tolist())
    assert all(0 <= s["median"] and 0 <= s["drawn"] for s in saved["steps"])
    predictability = load_script("predictability")
    # one worker, episodes of 150 in chunks of 200: the second chunk begins with the rest of an episode, which
    # cannot be replayed from the start state -> one error line, exit 2 (every training window is scored)
    cut = tmp_path / "cut"
    done = run_script("collect_data.py", "--rom", cartridge_rom, "--out-dir", cut, "--total-steps", 400, "--workers", 1,
                      "--episode-length", 150, "--save-interval", 200, "--seed", 1, "--policy", "explore",
                      "--save-state", start_state_file)
    assert done.returncode == 0, done.stderr[-3000:]
    bad = run_script("predictability.py", "--rom", cartridge_rom, "--save-state", start_state_file, "--data-dir", cut,
                     "--val-split", 0, "--episodes", "train", "--horizon", 12, "--max-sequences", 1000, "--draws", 1,
                     "--out-dir", tmp_path / "cut_out")
    assert bad.returncode == 2 and "cut across chunks" in bad.stderr, bad.stderr[-2000:]
    floor_errors = predictability.floor_errors
    logged = np.array([[[0, 5, 5], [0, 6, 5]]])  # (1 window, K 2, (map, x, y))
    futures = np.array([[[[0, 5, 5], [0, 6, 5]], [[0, 5, 5], [0, 6, 7]], [[0, 5, 5], [0, 6, 5]]]])  # 3 draws
    drawn, median = floor_errors(futures, logged)
    assert drawn.tolist() == [[0, pytest.approx(2 / 3)]] and median.tolist() == [[0, 0]]
    # a start state the data did not start from: the replay leaves the logged path -> one error line, exit 2
    from env import open_emulator, step_emulator
    from save_states import load_state_bytes, save_state_bytes

    pyboy, _ = open_emulator(cartridge_rom)
    load_state_bytes(pyboy, start_state_file.read_bytes())
    for action in (2, 2, 2, 2):  # ACTIONS[2]: right, a turn and three steps away
        step_emulator(pyboy, action)
    other = tmp_path / "moved.state"
    other.write_bytes(save_state_bytes(pyboy))
    pyboy.stop(save=False)
    bad = run_script("predictability.py", "--rom", cartridge_rom, "--save-state", other, "--data-dir", data,
                     "--val-split", 0.5, "--horizon", 12, "--max-sequences", 6, "--draws", 1, "--out-dir", tmp_path / "bad")
    assert bad.returncode == 2 and "leaves the logged path" in bad.stderr, bad.stderr[-2000:]


def test_local_detached_keeps_the_local_prior_off_the_gru():
    """local_detached: the prior's logits are the same values, the local latents' KL reaches the prior's layers but
    not h, the global latents' KL reaches h, and overshooting pulls the global latents alone; the model trains."""
    torch.manual_seed(0)
    cfg = tiles_config(stoch=94, local_latents=True, local_in_state=False, local_detached=True, place_input="deter",
                       overshoot=2, place_scale=1.0)
    wm = WorldModel(cfg)
    rssm, classes = wm.rssm, cfg.classes
    h = torch.randn(3, cfg.deter, requires_grad=True)
    logits = rssm.prior_logits(h)
    assert torch.allclose(logits, rssm.prior_net(h), atol=1e-6)
    logits[:, 4 * classes:].sum().backward()  # the local latents' logits alone
    assert h.grad.abs().sum() == 0  # zeros: the cat's gradient reaches h through the global rows only
    assert rssm.prior_net[-1].weight.grad[4 * classes:].abs().sum() > 0
    rssm.prior_logits(h)[:, :4 * classes].sum().backward()
    assert h.grad.abs().sum() > 0
    _, z, logp = rssm.img_step(h, torch.zeros(3, 94 * classes), torch.tensor([0, 1, 2]), state_only=True)
    assert z.shape == (3, 4 * classes) and logp.shape == (3, 4, classes)
    total, losses, _, _ = wm(None, torch.randint(0, 8, (2, 4)), torch.zeros(2, 4), torch.ones(2, 4),
                             tile_ids=torch.randint(0, 64, (2, 4, 18, 20)), frame_metrics=False,
                             places={key: torch.randint(0, 5, (2, 4)) for key in ("xs", "ys", "map_ids", "facings")})
    total.backward()
    assert torch.isfinite(losses["overshoot"]) and rssm.img_in[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="local_detached"):
        tiles_config(local_detached=True)
