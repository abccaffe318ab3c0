"""SPD: the first device (stage 1 + the protocol) and the speculative module, as SimPy processes.

The protocol is `spdsim.protocol.SpdController` — the same object the executor's first rank drives —
so the simulator models exactly what the executor runs (window W, epochs instead of a flush broadcast,
verification at the first device on RESULT, stale messages processed and wasted downstream).

First device, per issued position q (window W = n; PP and AR are W = 1 with no drafting):
  1. wait until `can_issue()`; if position q's input is a draft, until that draft (q, epoch) is ready;
  2. stage-1 forward of q (embedding + its layers), then send ACT(q) to stage 2 (or, with n = 1, its
     RESULT to itself);
  3. draft the token at q+1. Co-located module: on this device right after the forward, sequential with
     it, once the features it needs have arrived. Dedicated module: an ISSUE(q) message goes to its
     device before the forward, and it drafts in parallel; its DRAFT(q+1) comes back over a link.
  Messages are read, one at a time, only when the first device cannot issue (or waits for features),
  exactly as the executor's first rank reads its sockets: `on_result` commits, and asks the acceptance
  process (the `accept` callback) whether the draft at p+1 holds; a rejection bumps the epoch and
  re-issues p+1 with the true token.

TP (a stage on a TP group, `spdsim.protocol`): this process is stage 1's TP rank 0. It sends each issue
to its TP peers before the forward (the forward's compute event ends once the slowest peer can have
finished: `Sim.issue_wait_ns`), the activation leaves as tp parallel messages (`Sim.send_act`), and the
module, the verification and RESULT stay on rank 0.

Features (a trained drafter, `head.features: true`): the draft of q+1 uses what exists when q enters
stage 1 (DESIGN §2): stage s's output for q-s (1-based s), and everything older. Each stage sends its
checkpoint features to the module's device every tick; the draft waits until the ones it needs for the
current epoch are there. With `features: false` (an oracle drafter) it waits for nothing.
"""
from __future__ import annotations

from spdsim.kernel import ACT, DRAFT, FEATURE, ISSUE, RESULT, Sim
from spdsim.partition import RESULT_BYTES
from spdsim.protocol import SpdController
from spdsim.schemes.base import Scheme


def _window(n: int) -> int:
    return n


SPD = Scheme("spd", window=_window, drafts=True)


def _features_ready(feats: dict, issue_epoch: dict, q: int, n: int, first_decode: int) -> bool:
    """Has every feature the draft of q+1 needs arrived? Stage j (0-based) output of position q-1-j."""
    for j in range(n):
        pos = q - 1 - j
        if pos < first_decode:        # prefill positions: their features exist before decoding starts
            return True
        if feats.get((j, pos)) != issue_epoch[pos]:
            return False
    return True


def first_device(sim: Sim):
    env, cfg, plan, n = sim.env, sim.cfg, sim.plan, sim.n
    ctl = SpdController(cfg.prompt_tokens, cfg.new_tokens, cfg.window)
    box, log = sim.first_box, sim.log
    dev = plan.placement[0]
    first_decode = cfg.prompt_tokens - 1
    colocated = sim.head_device is not None and sim.head_device == dev
    dedicated = sim.head_device is not None and not colocated
    wait_features = cfg.features and sim.head_device is not None
    feats: dict[tuple[int, int], int] = {}       # (stage, position) → epoch of the feature that arrived
    issue_epoch: dict[int, int] = {}              # position → epoch of its latest issue
    drafts: set[tuple[int, int]] = set()          # (position, epoch) of drafted tokens ready here
    accept = cfg.accept
    tp = sim.tp > 1

    def handle(msg: tuple) -> None:
        kind = msg[0]
        if kind == RESULT:
            _, e, p = msg
            t = env.now
            v = ctl.on_result(p, e, accept)
            if v.stale:
                return
            sim.committed.add((p, e))
            for kind, pos, acc in v.marks():
                log.append((kind, t, t, -1, dev, pos, e, 0, "", acc))
            if ctl.done and not sim.done.triggered:
                sim.done.succeed()
        elif kind == FEATURE:
            feats[(msg[3], msg[2])] = msg[1]
        elif kind == DRAFT:
            drafts.add((msg[2], msg[1]))

    while True:
        if ctl.done:
            return
        q = ctl.next_position
        ready = ctl.can_issue() and (q < ctl.known or not sim.head_device or (q, ctl.epoch) in drafts)
        if not ready:
            # As the executor's first rank does: it reads a message only when it cannot issue, one at a
            # time. A RESULT that arrived while it was drafting waits, so the next position goes in with
            # its draft and is verified later (reading it first would issue the true token instead).
            if box.items:
                handle(box.items.popleft())
            else:
                yield box.wait()
            continue
        issue = ctl.issue()
        q, e = issue.position, issue.epoch
        issue_epoch[q] = e
        drafting = sim.head_device is not None and q + 1 <= ctl.last_useful
        if drafting and dedicated:
            sim.send(dev, sim.head_device, RESULT_BYTES, sim.head_box, (ISSUE, e, q), 0)
        if sim._first_tick:
            yield env.timeout(sim._first_tick)
        t0 = env.now
        if tp:      # the issue goes to stage 1's TP peers first; the group's forward ends after theirs
            yield env.timeout(sim.issue_wait_ns(q, e) + sim.stage_ns(0, q))
            sim.log_compute(t0, 0, dev, q, e)
        else:
            yield env.timeout(sim.stage_ns(0, q))
            log.append(("compute", t0, env.now, 0, dev, q, e, 0, "", None))
        if n == 1:
            box.put((RESULT, e, q))
        elif tp:
            sim.send_act(0, sim.stage_boxes[1], (ACT, e, q))
        else:
            sim.send(dev, plan.placement[1], cfg.activation_bytes, sim.stage_boxes[1], (ACT, e, q), 0)
            if sim._send_block:
                yield env.timeout(sim._send_block)
        if wait_features:
            if colocated:
                feats[(0, q)] = e
            else:
                sim.send(dev, sim.head_device, cfg.feature_bytes, sim.head_box, (FEATURE, e, q, 0), 0)
        if drafting and colocated:
            # the module shares this device: wait for its features, then draft q+1 here
            while wait_features and not _features_ready(feats, issue_epoch, q, n, first_decode):
                if box.items:
                    handle(box.items.popleft())
                else:
                    yield box.wait()
                if ctl.epoch != e or ctl.done:
                    break
            if ctl.epoch != e or ctl.done:
                continue
            t0 = env.now
            yield env.timeout(sim.head_ns(q + 1))
            log.append(("head", t0, env.now, -1, dev, q + 1, e, 0, "", None))
            drafts.add((q + 1, e))


def speculative_module(sim: Sim):
    """The module on a dedicated device: ISSUE(q) in, draft q+1, DRAFT(q+1) back to the first device.

    It learns of a flush from the next ISSUE's newer epoch and drops older requests then."""
    env, cfg, plan, n = sim.env, sim.cfg, sim.plan, sim.n
    box, log, dev = sim.head_box, sim.log, sim.head_device
    first = plan.placement[0]
    first_decode = cfg.prompt_tokens - 1
    feats: dict[tuple[int, int], int] = {}
    issue_epoch: dict[int, int] = {}
    requests: list[tuple[int, int]] = []          # (q, epoch) waiting to be drafted
    while True:
        while box.items:
            msg = box.items.popleft()
            if msg[0] == FEATURE:
                feats[(msg[3], msg[2])] = msg[1]
            else:                                # ISSUE
                _, e, q = msg
                issue_epoch[q] = e
                requests = [r for r in requests if r[1] >= e]
                requests.append((q, e))
        if requests and (not cfg.features or _features_ready(feats, issue_epoch, requests[0][0], n, first_decode)):
            q, e = requests.pop(0)
            t0 = env.now
            yield env.timeout(sim.head_ns(q + 1))
            log.append(("head", t0, env.now, -1, dev, q + 1, e, 0, "", None))
            sim.send(dev, first, RESULT_BYTES, sim.first_box, (DRAFT, e, q + 1), -1)
            continue
        yield box.wait()
