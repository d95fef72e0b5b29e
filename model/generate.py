"""Prefill and decode steps over the pipeline, sampling on the last stage, results shared by the replica.

Every rank of a replica runs each step with the same StepPlan, in the same order. Each stage receives
activations from the previous one (or embeds the tokens), runs its layers against its own KV cache and passes
the result on; prefill batches are split into micro-batches (Megatron's rule, row by row: rows × width within
threshold, each micro-batch as wide as its widest row) so the stages overlap. A decode step runs over slot
rows [0, rows) of its lane up to a context length, attention reading the paged KV cache through each slot's
block table (kv_cache.py), which the plan sets; a prefill may start past a prompt's blocks already in the
cache. On a GPU, rows and context come from a few buckets, one CUDA graph each, captured at warm-up
(cuda_graphs.py); on a CPU a step reads no more cache than its longest row needs. model.compile compiles each
layer's parts around attention (once for every layer).
The last stage's TP rank 0 (the output rank) turns the logits into tokens and log-probabilities, on the
device; greedy-only steps never gather the logits. A step copies only its outputs to the host.

Two ways to run a step. step(plan) shares the outputs with every rank and returns when the whole replica is
done: what generate_greedy and tests use. launch(plan) returns as soon as this rank's stage is done and its
activations are on their way, and only the leader gets the outputs, from land(): so while the next stage runs
one step, this stage runs the next. The KV-cache slots are split into lanes, one per pipeline stage, each
lane's decode running over its own slot rows, so that the engine keeps one step of every lane in flight and
no stage waits for another.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from fleetgen.model.cuda_graphs import DecodeGraphs, StepInputs, context_buckets, row_buckets
from fleetgen.model.kv_cache import BLOCK_SIZE, KVCache
from fleetgen.model.parallel import (ParallelState, broadcast_from_last_stage, recv_from_output_rank,
                                     recv_from_prev_pipeline_rank, send_to_first_rank, send_to_next_pipeline_rank,
                                     vocab_parallel_argmax)
from fleetgen.model.sampling import (apply_logit_bias, apply_penalties, apply_token_mask, ban_tokens,
                                     generated_counts, history_mask, sample)
from fleetgen.model.transformer import DecoderStage, LayerParts, decode_mask

HOST_TOKEN_BUFFERS = 4  # pinned buffers the tokens of steps in flight (two at most) are copied into, in turn
MICROBATCH_THRESHOLD = 512  # Megatron's inference_batch_times_seqlen_threshold


def compiled_layer_parts() -> LayerParts:
    """torch.compile of a layer's two parts around attention: inductor's kernels (C++ on CPU, Triton on GPU)
    fuse the norms, rotations, activations and residual adds between the matrix products. Their shapes depend
    on the rows alone and every layer runs the same code on its own weights, so one compilation serves every
    layer and (dynamic after the first) every row count."""
    return LayerParts(torch.compile(_before_attention), torch.compile(_after_attention))


def _before_attention(block, x: torch.Tensor, rope):
    return block.before_attention(x, rope)


def _after_attention(block, x: torch.Tensor, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    return block.after_attention(x, h, attended)


@dataclass
class StepPlan:
    """One step for a set of KV-cache slots; identical on every rank of the replica."""
    kind: str                   # "prefill" | "decode"
    slots: torch.Tensor         # int64 [n] KV-cache slots in [0, max_batch)
    tokens: torch.Tensor        # int64 prefill: [n, L] prompts right-padded (any pad id); decode: [n, 1]
    lengths: torch.Tensor       # int64 [n] prefill: prompt lengths; decode: position of tokens[:, 0]
    temperature: torch.Tensor   # float32 [n]
    top_k: torch.Tensor         # int64 [n], 0 = off
    top_p: torch.Tensor         # float32 [n], after top-k; 0 or 1 = off
    greedy: torch.Tensor        # bool [n]
    repetition_penalty: torch.Tensor  # float32 [n], >= 1; 1 = off
    ban_eos: torch.Tensor       # bool [n]: logits[eos] = -inf
    seed: torch.Tensor          # int64 [n], -1 = none; prefill only: seeds the slot's own torch.Generator
    logprobs: bool = False      # log_softmax(raw logits) at chosen tokens (and at prompt tokens in prefill)
    full_logprobs: bool = False  # whole log_softmax rows over the real vocabulary
    # OpenAI's logits processing, every row greedy or not; None when no row of the step has it
    presence_penalty: Optional[torch.Tensor] = None   # float32 [n], 0 = off: over the tokens generated so far
    frequency_penalty: Optional[torch.Tensor] = None  # float32 [n], 0 = off: ditto, times each token's count
    bias_ids: Optional[torch.Tensor] = None     # int64 [n, K] logit_bias token ids, -1 = none
    bias_values: Optional[torch.Tensor] = None  # float32 [n, K] added to those logits
    token_mask: Optional[torch.Tensor] = None   # int32 [n, ceil(vocab / 32)] allowed-token bitmask (-1 = all)
    # the paged KV cache (kv_cache.py): each row's blocks, in position order (-1 = none); None: prefill gives each
    # slot its own run of blocks, decode keeps the slot's table
    blocks: Optional[torch.Tensor] = None       # int64 [n, W]
    starts: Optional[torch.Tensor] = None       # int64 [n] prefill: leading prompt tokens already in those blocks
    resumed: Optional[torch.Tensor] = None      # int64 [n] prefill: trailing prompt tokens that were generated
                                                # (a preempted sequence computed again), not prompt for penalties

    @property
    def processes_logits(self) -> bool:
        """Whether some row's logits change before the choice (beyond ban_eos): then no argmax-only step."""
        return self.presence_penalty is not None or self.bias_ids is not None or self.token_mask is not None

    @property
    def n(self) -> int:
        return self.slots.numel()


@dataclass
class StepOutput:
    """Identical on every rank of the replica; CPU tensors."""
    tokens: torch.Tensor                     # int64 [n] next token of each slot
    logprobs: Optional[torch.Tensor] = None  # float32 [n] logprob of tokens under the raw logits
    prompt_logprobs: Optional[torch.Tensor] = None  # prefill: float32 [n, L-1], 0 past a prompt's length
    full_logprobs: Optional[torch.Tensor] = None    # float32 prefill [n, L, vocab] / decode [n, 1, vocab]


@dataclass
class Flight:
    """A step this rank launched and has not landed: the output rank's results (on the leader, the buffers
    they arrive in) and the sends and receives still under way, each with the tensor it uses. A lone rank on a
    GPU also has its tokens' copy to the host under way (host_tokens, done at copied)."""
    plan: StepPlan
    outputs: dict[str, torch.Tensor]
    pending: list[tuple[object, torch.Tensor]]
    host_tokens: Optional[torch.Tensor] = None
    copied: Optional[torch.cuda.Event] = None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A plan's CPU tensor on the device without waiting for the device: torch's blocking copy would first
    wait for every step already queued, and the host would no longer run ahead of the GPU."""
    return tensor.to(device, non_blocking=True)


def greedy_plan(kind: str, slots: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> StepPlan:
    """A plan that takes the argmax for every row."""
    n = slots.numel()
    return StepPlan(kind=kind, slots=slots, tokens=tokens, lengths=lengths,
                    temperature=torch.ones(n), top_k=torch.zeros(n, dtype=torch.long), top_p=torch.zeros(n),
                    greedy=torch.ones(n, dtype=torch.bool), repetition_penalty=torch.ones(n),
                    ban_eos=torch.zeros(n, dtype=torch.bool), seed=torch.full((n,), -1))


class Generator:
    def __init__(self, stage: DecoderStage, ps: ParallelState, max_batch: int, max_seq_len: int,
                 microbatch_threshold: int = MICROBATCH_THRESHOLD, compile: bool = False, lanes: int = 1,
                 graphs: Optional[bool] = None, num_blocks: Optional[int] = None, block_size: int = BLOCK_SIZE):
        """graphs: decode through bucketed graphs (cuda_graphs.py) once capture_graphs() has run; None: on a GPU.
        On a CPU they are not captured but run as they are, which tests use. max_batch: slots, the most
        sequences at once; num_blocks: the KV cache's blocks of block_size positions (None: max_seq_len
        positions for every slot, kv_cache.py)."""
        self.stage, self.ps, self.config = stage, ps, stage.config
        self._parts = compiled_layer_parts() if compile else None
        self.max_batch, self.max_seq_len, self.microbatch_threshold = max_batch, max_seq_len, microbatch_threshold
        self.cache = KVCache(len(stage.layers), max_batch, max_seq_len, stage.kv_heads, self.config.head_dim,
                             stage.dtype, ps.device, num_blocks, block_size)
        self.lane_size = -(-max_batch // lanes)
        self.lanes = [range(first, min(first + self.lane_size, max_batch))
                      for first in range(0, max_batch, self.lane_size)]  # slot ranges
        self._lane_caches = [self.cache.slots(lane.start, len(lane)) for lane in self.lanes]
        # each slot's prompt + fed tokens, for the repetition penalty; past prompt_len, the generated ones, for
        # the presence and frequency penalties
        self.history = torch.zeros(max_batch, max_seq_len, dtype=torch.long, device=ps.device)
        self.history_len = torch.zeros(max_batch, dtype=torch.long, device=ps.device)
        self.prompt_len = torch.zeros(max_batch, dtype=torch.long, device=ps.device)
        self.rngs: list[Optional[torch.Generator]] = [None] * max_batch
        # a lone rank's next decode step may take its tokens from the last step's outputs, still on the device
        # (launch(feed=)), so that the host prepares step t + 1 while the device runs step t
        self.can_feed = len(ps.replica_ranks) == 1
        self._host_tokens = [torch.zeros(max_batch, dtype=torch.long, pin_memory=ps.device.type == "cuda")
                             for _ in range(HOST_TOKEN_BUFFERS)]
        self._host_turn = 0
        self.use_graphs = ps.device.type == "cuda" if graphs is None else graphs
        self._graphs: list[Optional[DecodeGraphs]] = [None] * len(self.lanes)  # capture_graphs() fills them
        self.is_output_rank = ps.world_rank == ps.output_rank
        self.is_leader = ps.world_rank == ps.first_rank

    def lane_of(self, slot: int) -> int:
        return slot // self.lane_size

    def capture_graphs(self) -> int:
        """GPU: capture every lane's decode graphs (cuda_graphs.py); from now on decode steps replay them.
        Collective within each stage, after an eager step (which creates the NCCL communicators). Returns the
        number of graphs."""
        if not self.use_graphs:
            return 0
        contexts = context_buckets(self.max_seq_len)
        for lane, slots in enumerate(self.lanes):
            inputs = StepInputs(len(slots), self.cache.scratch, self.ps.device)
            h_in = None if self.ps.is_first_stage else torch.zeros(
                len(slots), 1, self.config.hidden_size, dtype=self.stage.dtype, device=self.ps.device)
            graphs = DecodeGraphs(self._graph_step(lane, inputs, h_in), inputs, h_in, row_buckets(len(slots)),
                                  contexts)
            graphs.capture()
            self._graphs[lane] = graphs
        return sum(len(g) for g in self._graphs)

    def _graph_step(self, lane: int, inputs: StepInputs, h_in: Optional[torch.Tensor]):
        """What one decode graph of a lane runs: the stage's layers over the lane's first rows rows."""
        cache = self._lane_caches[lane]

        def step(rows: int, context: int) -> torch.Tensor:
            ids, positions, writes = inputs.view(rows)
            mask = decode_mask(positions, context, self.stage.dtype)  # [rows, 1, 1, context]
            h = self.stage.embed(ids, positions) if h_in is None else h_in[:rows]
            return self.stage.decode_layers(h, positions, writes, mask, cache, self._parts)
        return step

    def step(self, plan: StepPlan) -> StepOutput:
        """Collective over the replica: every rank calls it with the same plan and gets the same outputs."""
        outputs, sends = self._run(plan)
        for work, _ in sends:
            work.wait()
        return self._share(plan, outputs)

    def launch(self, plan: StepPlan, feed: Optional[Flight] = None) -> Flight:
        """This rank's share of a step, returning once its activations are on their way to the next stage.
        Every rank launches the same plans in the same order and lands each of them (land), oldest first.
        feed (a lone rank, a decode plan): the step in flight whose tokens this step feeds, on the device;
        plan.tokens is then ignored. Every slot of plan must be a row of feed."""
        if feed is not None and not (self.can_feed and plan.kind == "decode"):
            raise ValueError("launch(feed=...): only a lone rank's decode step takes its tokens on the device")
        shapes = self._output_shapes(plan)
        received: dict[str, torch.Tensor] = {}
        if self.is_leader and not self.is_output_rank:  # posted before the output rank sends
            received = {name: torch.empty(shape, dtype=dtype, device=self.ps.device)
                        for name, (shape, dtype) in shapes.items()}
        pending = [(recv_from_output_rank(tensor, self.ps), tensor) for tensor in received.values()]
        outputs, sends = self._run(plan, feed)
        if self.is_output_rank and not self.is_leader:
            replies = [outputs[name].contiguous() for name in shapes]
            pending += [(send_to_first_rank(tensor, self.ps), tensor) for tensor in replies]
        flight = Flight(plan, received or outputs, pending + sends)
        if self.can_feed and self.ps.device.type == "cuda":  # the tokens start home at once; land() waits for them
            flight.host_tokens = self._host_tokens[self._host_turn][:plan.n]
            self._host_turn = (self._host_turn + 1) % HOST_TOKEN_BUFFERS
            flight.host_tokens.copy_(outputs["tokens"], non_blocking=True)
            flight.copied = torch.cuda.Event()
            flight.copied.record()
        return flight

    def land(self, flight: Flight) -> Optional[StepOutput]:
        """Wait for a launched step's sends and receives; the leader gets its outputs, CPU tensors."""
        for work, _ in flight.pending:
            work.wait()
        if not self.is_leader:
            return None
        outputs = {}
        for name in self._output_shapes(flight.plan):
            if name == "tokens" and flight.copied is not None:
                flight.copied.synchronize()  # not the whole stream: a later step may be running
                outputs[name] = flight.host_tokens.clone()  # its buffer serves a later step
            else:
                outputs[name] = flight.outputs[name].cpu()
        return StepOutput(**outputs)

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Collective. Exactly max_new_tokens argmax tokens per prompt (no stop at eos), without the prompt. A
        lone rank feeds each decode step the last one's tokens on the device, a step ahead of the host."""
        longest = max((len(p) for p in prompts), default=0)
        if max_new_tokens and longest + max_new_tokens - 1 > self.max_seq_len:
            raise ValueError(f"generate_greedy: a {longest}-token prompt + {max_new_tokens} new tokens exceed "
                             f"max_seq_len={self.max_seq_len}")
        results = []
        for start in range(0, len(prompts), self.lane_size):  # a decode step stays within a lane
            chunk = prompts[start:start + self.lane_size]
            lengths = torch.tensor([len(p) for p in chunk])
            tokens = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)  # [n, L] right-padded
            for row, prompt in enumerate(chunk):
                tokens[row, :len(prompt)] = torch.tensor(prompt)
            slots = torch.arange(len(chunk))
            prefill = greedy_plan("prefill", slots, tokens, lengths)
            if not max_new_tokens:
                out = []
            elif self.can_feed:
                out = self._greedy_fed(prefill, max_new_tokens)
            else:
                out = [self.step(prefill).tokens]
                for i in range(max_new_tokens - 1):
                    out.append(self.step(greedy_plan("decode", slots, out[-1][:, None], lengths + i)).tokens)
            results += torch.stack(out, dim=1).tolist() if out else [[] for _ in chunk]
        return results

    def _greedy_fed(self, prefill: StepPlan, max_new_tokens: int) -> list[torch.Tensor]:
        """A lone rank's greedy steps, each launched before the last one lands and fed its tokens on the device."""
        flights = deque([self.launch(prefill)])
        out = []
        placeholder = torch.zeros(prefill.n, 1, dtype=torch.long)
        for i in range(max_new_tokens - 1):
            plan = greedy_plan("decode", prefill.slots, placeholder, prefill.lengths + i)
            flights.append(self.launch(plan, feed=flights[-1]))
            out.append(self.land(flights.popleft()).tokens)
        out.append(self.land(flights.popleft()).tokens)
        return out

    def _run(self, plan: StepPlan, feed: Optional[Flight] = None
             ) -> tuple[dict[str, torch.Tensor], list[tuple[object, torch.Tensor]]]:
        """This rank's share of a step: its stage's layers, and on the output rank the step's outputs (empty
        elsewhere). Also returns the sends to the next stage still under way, with the tensors they read."""
        self._check(plan)
        device = self.ps.device
        slots, tokens, lengths = (to_device(t, device) for t in (plan.slots, plan.tokens, plan.lengths))
        if feed is not None:
            tokens = self._fed_tokens(plan, feed)
        every = self._wants_all(plan)
        if plan.blocks is not None:
            self.cache.set_tables(slots, to_device(plan.blocks, device))
        elif plan.kind == "prefill":
            self.cache.reset_tables(slots)
        if plan.kind == "prefill":
            self._start(plan, slots, tokens, lengths)
        else:
            self.history[slots, lengths] = tokens[:, 0]
            self.history_len[slots] = lengths + 1
        sends: list[tuple[object, torch.Tensor]] = []
        with torch.no_grad():  # not inference_mode: callers may modify the returned tensors in place
            if plan.kind == "prefill":
                logits = self._prefill(plan, tokens, slots, lengths, every, sends)
            else:
                h = self._decode(plan, tokens, slots, lengths, sends)
                if self.ps.is_last_stage and self._argmax_only(plan):
                    chosen = self._greedy(h[:, 0], plan)
                    return ({"tokens": chosen} if self.is_output_rank else {}), sends
                logits = self.stage.logits(h if every else h[:, 0]) if self.ps.is_last_stage else None
            outputs = self._outputs(plan, logits, slots, tokens, lengths) if self.is_output_rank else {}
        return outputs, sends

    def _fed_tokens(self, plan: StepPlan, feed: Flight) -> torch.Tensor:
        """[n, 1] on the device: each slot's token from the step in flight that feeds this one."""
        rows = {slot: row for row, slot in enumerate(feed.plan.slots.tolist())}
        missing = [slot for slot in plan.slots.tolist() if slot not in rows]
        if missing:
            raise ValueError(f"launch(feed=...): slots {missing} are not in the feeding step")
        index = to_device(torch.tensor([rows[slot] for slot in plan.slots.tolist()]), self.ps.device)
        return feed.outputs["tokens"].index_select(0, index)[:, None]

    def _start(self, plan: StepPlan, slots: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """A prefill starts each slot afresh: its history and its seeded generator."""
        width = tokens.shape[1]
        self.history[slots, :width] = tokens
        self.history_len[slots] = lengths
        self.prompt_len[slots] = lengths if plan.resumed is None else lengths - to_device(plan.resumed, slots.device)
        for slot, seed in zip(plan.slots.tolist(), plan.seed.tolist()):
            self.rngs[slot] = None
            if seed >= 0:
                self.rngs[slot] = torch.Generator(device=self.ps.device).manual_seed(seed)

    @staticmethod
    def _wants_all(plan: StepPlan) -> bool:
        """Whether every position's logits are needed, not just each row's last."""
        return (plan.logprobs and plan.kind == "prefill") or plan.full_logprobs

    def _prefill(self, plan: StepPlan, tokens: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                 every: bool, sends: list):
        """Last stage: fp32 logits [n, vocab] at each prompt's last token, or [n, s, vocab] when every.
        Rows with starts compute only their prompt's tokens past them, attending to the cached ones too."""
        ps, stage = self.ps, self.stage
        starts = plan.starts if plan.starts is not None and plan.starts.any() else None  # CPU: no device sync
        computed = plan.lengths - (0 if starts is None else starts)
        widths = [tokens.shape[1]] * plan.n if every else computed.tolist()  # every: one width, for the logits
        logits = []
        for first, last in self._microbatches(widths):
            rows, m, s = slice(first, last), last - first, max(widths[first:last])
            ids, positions, writes = self._prefill_rows(tokens[rows], lengths[rows],
                                                        None if starts is None else starts[rows], s)
            if ps.is_first_stage:
                h = stage.embed(ids, positions)  # [m, s, H]
            else:
                h = recv_from_prev_pipeline_rank((m, s, self.config.hidden_size), stage.dtype, ps)
            mask = None if starts is None else decode_mask(positions, int(plan.lengths[rows].max()), stage.dtype)
            h = stage.prefill_layers(h, positions, slots[rows], self.cache, writes, mask)
            if not ps.is_last_stage:
                sends.append((send_to_next_pipeline_rank(h, ps), h))  # h stays alive until sent
            elif every:
                logits.append(stage.logits(h))  # [m, s, vocab]
            else:
                last_token = to_device(computed[rows] - 1, h.device)
                logits.append(stage.logits(h[torch.arange(m, device=h.device), last_token]))  # [m, vocab]
        return torch.cat(logits) if ps.is_last_stage else None

    def _microbatches(self, widths: list[int]) -> list[tuple[int, int]]:
        """Row ranges [first, last) of a prefill, in order, each padded to its own widest row: Megatron's rule
        (rows × width within microbatch_threshold, at least one row) taken row by row, so that a long prompt
        does not pad the short remainders of prompts found in the cache."""
        ranges, first, widest = [], 0, 0
        for row, width in enumerate(widths):
            wider = max(widest, width)
            if row > first and wider * (row - first + 1) > self.microbatch_threshold:
                ranges.append((first, row))
                first, wider = row, width
            widest = wider
        return ranges + [(first, len(widths))]

    def _prefill_rows(self, tokens: torch.Tensor, lengths: torch.Tensor, starts: Optional[torch.Tensor],
                      width: int):
        """The tokens [m, width] a micro-batch computes, their positions, and where they are stored (padding at
        the cache's scratch position). starts None: every row from position 0."""
        device, scratch = tokens.device, self.cache.scratch
        offsets = torch.arange(width, device=device)
        if starts is None:
            positions = offsets.expand(tokens.shape[0], -1)
            return tokens[:, :width], positions, torch.where(positions < lengths[:, None], positions, scratch)
        starts = to_device(starts, device)
        positions = (starts[:, None] + offsets).clamp(max=tokens.shape[1] - 1)  # padding: any valid position
        inside = offsets < (lengths - starts)[:, None]
        return tokens.gather(1, positions), positions, torch.where(inside, positions, scratch)

    def _decode(self, plan: StepPlan, tokens: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                sends: list) -> Optional[torch.Tensor]:
        """Last stage: hidden states [n, 1, H] of the plan's rows. The step runs over the slot rows
        [0, rows) of the plan's lane whatever the plan's slots, so that its shapes depend on rows alone: a
        captured graph at bucketed rows and context on a GPU, an eager step on exactly what it needs on a CPU.
        Rows without a token of this plan store at the cache's scratch position."""
        lane = self.lane_of(int(plan.slots.min()))  # from the plan's CPU copies: no device sync
        first = self.lanes[lane].start
        rows, context = int(plan.slots.max()) + 1 - first, int(plan.lengths.max()) + 1
        if self._graphs[lane] is not None:
            return self._replay(lane, plan, tokens, rows, context, sends)
        ps, stage, device, cache = self.ps, self.stage, tokens.device, self._lane_caches[lane]
        rows_of = slots - first  # each slot's row in its lane
        ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        ids[rows_of] = tokens
        positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        positions[rows_of] = lengths[:, None]
        writes = torch.full((rows, 1), cache.scratch, dtype=torch.long, device=device)
        writes[rows_of] = lengths[:, None]
        mask = decode_mask(positions, context, stage.dtype)  # [rows, 1, 1, context]
        if ps.is_first_stage:
            h = stage.embed(ids, positions)  # [rows, 1, H]
        else:
            h = recv_from_prev_pipeline_rank((rows, 1, self.config.hidden_size), stage.dtype, ps)
        h = stage.decode_layers(h, positions, writes, mask, cache, self._parts)
        if not ps.is_last_stage:
            sends.append((send_to_next_pipeline_rank(h, ps), h))
            return None
        return h[rows_of]

    def _replay(self, lane: int, plan: StepPlan, tokens: torch.Tensor, rows: int, context: int,
                sends: list) -> Optional[torch.Tensor]:
        graphs, ps = self._graphs[lane], self.ps
        graphs.inputs.fill(plan.slots - self.lanes[lane].start, plan.lengths)
        graphs.inputs.set_ids(tokens[:, 0])
        rows, context = graphs.bucket(rows, context)
        if not ps.is_first_stage:
            graphs.h_in[:rows].copy_(recv_from_prev_pipeline_rank((rows, 1, self.config.hidden_size),
                                                                  self.stage.dtype, ps))
        h = graphs.replay(rows, context)  # [rows, 1, H], the graph's own buffer until this lane's next replay
        if not ps.is_last_stage:
            sends.append((send_to_next_pipeline_rank(h, ps), h))
            return None
        return h.index_select(0, graphs.inputs.rows_of(plan.n))

    @staticmethod
    def _argmax_only(plan: StepPlan) -> bool:
        """Whether the step needs nothing but each row's argmax: then no TP rank gathers the logits."""
        return bool(plan.greedy.all()) and not (plan.logprobs or plan.full_logprobs or plan.processes_logits)

    def _greedy(self, h: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """Argmax tokens [n] of h [n, H] from each TP rank's slice of the vocabulary; eos banned where asked."""
        logits, start = self.stage.local_logits(h)  # [n, <= padded_vocab / TP], columns [start, ...)
        eos = self.config.eos_id
        if plan.ban_eos.any() and start <= eos < start + logits.shape[-1]:
            logits[to_device(plan.ban_eos, logits.device), eos - start] = float("-inf")
        best, index = logits.max(dim=-1)  # first maximum, like argmax
        return vocab_parallel_argmax(best, index + start, self.ps)

    def _outputs(self, plan: StepPlan, logits: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor,
                 lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        device = logits.device
        last = logits
        if logits.dim() == 3:
            last = logits[torch.arange(plan.n, device=device), lengths - 1] if plan.kind == "prefill" \
                else logits[:, 0]  # [n, vocab]
        chosen = self._sample(plan, last, slots)
        out = {"tokens": chosen}
        if plan.logprobs:
            out["logprobs"] = last.log_softmax(-1).gather(1, chosen[:, None]).squeeze(1)
        if plan.logprobs and plan.kind == "prefill":
            following_ids = tokens[:, 1:, None].clamp(0, logits.shape[-1] - 1)  # pad ids may be anything
            following = logits[:, :-1].log_softmax(-1).gather(2, following_ids).squeeze(2)  # [n, L-1]
            inside = torch.arange(1, tokens.shape[1], device=device) < lengths[:, None]
            out["prompt_logprobs"] = torch.where(inside, following, 0.0)
        if plan.full_logprobs:
            out["full_logprobs"] = logits.log_softmax(-1)
        return out

    def _sample(self, plan: StepPlan, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        device = logits.device
        if plan.processes_logits:
            logits = self._processed(plan, logits, slots)
        if plan.ban_eos.any():
            logits = ban_tokens(logits, to_device(plan.ban_eos, device), self.config.eos_id)
        penalised = ~plan.greedy & (plan.repetition_penalty != 1)
        seen = history_mask(self.history[slots], self.history_len[slots], logits.shape[-1]) \
            if penalised.any() else None
        return sample(logits, greedy=plan.greedy, temperature=plan.temperature, top_k=plan.top_k, top_p=plan.top_p,
                      repetition_penalty=plan.repetition_penalty, seen=seen,
                      generators=[self.rngs[s] for s in plan.slots.tolist()])

    def _processed(self, plan: StepPlan, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The grammar's mask, logit_bias and the presence and frequency penalties (sampling.py's order)."""
        device = logits.device
        if plan.token_mask is not None:
            logits = apply_token_mask(logits, to_device(plan.token_mask, device))
        if plan.bias_ids is not None:
            logits = apply_logit_bias(logits, to_device(plan.bias_ids, device), to_device(plan.bias_values, device))
        if plan.presence_penalty is not None:
            counts = generated_counts(self.history[slots], self.prompt_len[slots], self.history_len[slots],
                                      logits.shape[-1])
            logits = apply_penalties(logits, counts, to_device(plan.presence_penalty, device),
                                     to_device(plan.frequency_penalty, device))
        return logits

    def _share(self, plan: StepPlan, outputs: dict[str, torch.Tensor]) -> StepOutput:
        """Broadcast the output rank's results; the other ranks know the shapes from the plan."""
        shared = {}
        for name, (shape, dtype) in self._output_shapes(plan).items():
            tensor = outputs.get(name)
            if tensor is None:
                tensor = torch.empty(shape, dtype=dtype, device=self.ps.device)
            shared[name] = broadcast_from_last_stage(tensor.contiguous(), self.ps).cpu()
        return StepOutput(**shared)

    def _output_shapes(self, plan: StepPlan) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, s, vocab = plan.n, plan.tokens.shape[1], self.config.vocab_size
        shapes = {"tokens": ((n,), torch.long)}
        if plan.logprobs:
            shapes["logprobs"] = ((n,), torch.float32)
        if plan.logprobs and plan.kind == "prefill":
            shapes["prompt_logprobs"] = ((n, s - 1), torch.float32)
        if plan.full_logprobs:
            shapes["full_logprobs"] = ((n, s, vocab), torch.float32)
        return shapes

    def _check(self, plan: StepPlan) -> None:
        """Every rule a plan must keep, in plain Python over its CPU columns: it runs on the host before every
        step, while the device may be idle."""
        n = plan.n
        if plan.kind not in ("prefill", "decode"):
            raise ValueError(f"StepPlan.kind={plan.kind!r} is not 'prefill' or 'decode'")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"StepPlan: {n} slots, expected 1 to max_batch={self.max_batch}")
        slots = plan.slots.tolist()
        if len(set(slots)) != n or min(slots) < 0 or max(slots) >= self.max_batch:
            raise ValueError(f"StepPlan.slots={slots} must be distinct and in [0, {self.max_batch})")
        if plan.kind == "decode" and self.lane_of(min(slots)) != self.lane_of(max(slots)):
            raise ValueError(f"StepPlan.slots={slots}: a decode step's slots must lie in one lane "
                             f"of {self.lane_size} slots")
        width = plan.tokens.shape[1] if plan.tokens.dim() == 2 else -1
        if plan.tokens.shape[0] != n or (plan.kind == "decode" and width != 1) or width < 1:
            raise ValueError(f"StepPlan.tokens has shape {tuple(plan.tokens.shape)}, expected [{n}, "
                             f"{'1' if plan.kind == 'decode' else 'L'}] for {plan.kind}")
        for name in ("lengths", "temperature", "top_k", "top_p", "greedy", "repetition_penalty", "ban_eos",
                     "seed"):
            if tuple(getattr(plan, name).shape) != (n,):
                raise ValueError(f"StepPlan.{name} has shape {tuple(getattr(plan, name).shape)}, expected [{n}]")
        self._check_processing(plan)
        self._check_positions(plan, width)
        self._check_blocks(plan)
        if any(t <= 0 and not g for t, g in zip(plan.temperature.tolist(), plan.greedy.tolist())):
            raise ValueError("StepPlan.temperature must be > 0 where greedy is false")
        eos = self.config.eos_id
        if any(plan.ban_eos.tolist()) and (eos is None or not 0 <= eos < self.config.vocab_size):
            raise ValueError(f"StepPlan.ban_eos is set but the model's eos_id={eos} is not a vocabulary id")

    def _check_processing(self, plan: StepPlan) -> None:
        n, words = plan.n, -(-self.config.vocab_size // 32)
        if (plan.presence_penalty is None) != (plan.frequency_penalty is None):
            raise ValueError("StepPlan.presence_penalty and frequency_penalty come together or not at all")
        if (plan.bias_ids is None) != (plan.bias_values is None):
            raise ValueError("StepPlan.bias_ids and bias_values come together or not at all")
        expected = {"presence_penalty": (n,), "frequency_penalty": (n,), "token_mask": (n, words)}
        if plan.bias_ids is not None:
            expected.update(bias_ids=(n, plan.bias_ids.shape[-1]), bias_values=(n, plan.bias_ids.shape[-1]))
        for name, shape in expected.items():
            tensor = getattr(plan, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"StepPlan.{name} has shape {tuple(tensor.shape)}, expected {list(shape)}")
        if plan.bias_ids is not None and (plan.bias_ids >= self.config.vocab_size).any():
            raise ValueError(f"StepPlan.bias_ids: ids must be below the vocabulary size {self.config.vocab_size}")

    def _check_blocks(self, plan: StepPlan) -> None:
        cache, n = self.cache, plan.n
        if plan.blocks is None and not cache.identity_tables:
            raise ValueError(f"StepPlan.blocks: a cache of {cache.num_blocks} blocks cannot give each of "
                             f"{cache.max_batch} slots its own, so every plan names its rows' blocks")
        if plan.blocks is not None:
            if plan.blocks.dim() != 2 or plan.blocks.shape[0] != n or plan.blocks.shape[1] > cache.table.shape[1] - 1:
                raise ValueError(f"StepPlan.blocks has shape {tuple(plan.blocks.shape)}, expected [{n}, W <= "
                                 f"{cache.table.shape[1] - 1}]")
            if plan.blocks.numel() and not (-1 <= int(plan.blocks.min()) and int(plan.blocks.max()) < cache.num_blocks):
                raise ValueError(f"StepPlan.blocks: ids must be in [-1, {cache.num_blocks})")
        for name in ("starts", "resumed"):
            column = getattr(plan, name)
            if column is None:
                continue
            if plan.kind != "prefill" or tuple(column.shape) != (n,):
                raise ValueError(f"StepPlan.{name}: a prefill's [{n}] column")
            if (column < 0).any() or (column >= plan.lengths).any():
                raise ValueError(f"StepPlan.{name}={column.tolist()} must be in [0, lengths)")
        if plan.starts is not None and plan.starts.any():
            if self._wants_all(plan):
                raise ValueError("StepPlan.starts: a step that wants every position's logits computes them all")
            if plan.blocks is None:
                raise ValueError("StepPlan.starts: cached tokens are read through the plan's blocks")

    def _check_positions(self, plan: StepPlan, width: int) -> None:
        lengths = plan.lengths.tolist()
        if plan.kind == "prefill":
            if width > self.max_seq_len or min(lengths) < 1 or max(lengths) > width:
                raise ValueError(f"StepPlan.lengths={lengths} must be in [1, {width}] and the prompt "
                                 f"width {width} at most max_seq_len={self.max_seq_len}")
            inside = torch.arange(width) < plan.lengths[:, None]
            ids = plan.tokens[inside]
        else:
            if min(lengths) < 1 or max(lengths) >= self.max_seq_len:
                raise ValueError(f"StepPlan.lengths={lengths} must be in [1, {self.max_seq_len}) for decode")
            ids = plan.tokens
        low, high = ids.aminmax() if ids.numel() else (0, 0)
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"StepPlan.tokens: ids must be in [0, {self.config.vocab_size}), got "
                             f"{int(low)}..{int(high)}")
