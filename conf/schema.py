"""The composed config's types: Hydra composes YAML, these models check every value and name the bad one."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleetgen.model import constraints


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cluster(_Strict):
    kind: Literal["local", "slurm"]
    gpus_per_node: Optional[int] = Field(None, ge=0)  # None (local only): one GPU a rank if the machine has any
    visible_gpus: Optional[list[str]] = None  # local: the GPUs ranks 0, 1, ... drive (CUDA_VISIBLE_DEVICES entries)
    time_min: int = Field(60, ge=1)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = False
    tasks_per_node: Optional[int] = Field(None, ge=1)
    cpus_per_task: Optional[int] = Field(None, ge=1)
    mem_gb: Optional[float] = Field(None, gt=0)
    constraint: Optional[str] = None
    setup: list[str] = []
    env: dict[str, str | int | float] = {}  # numbers too: NCCL_DEBUG=1 on the command line is an int
    sbatch_args: dict[str, Any] = {}
    srun_args: list[str] = []

    @field_validator("visible_gpus", mode="before")
    @classmethod
    def _gpu_names_are_text(cls, names):
        # cluster.visible_gpus=[2,3] on the command line gives numbers; CUDA_VISIBLE_DEVICES entries are text
        return [str(name) for name in names] if isinstance(names, list) else names


class Container(_Strict):
    runtime: Literal["pyxis", "charliecloud"] = "pyxis"
    image: Optional[str] = None
    mounts: list[str] = []
    workdir: Optional[str] = None
    mount_home: bool = False
    python_version: str = Field("3.10", pattern=r"^3\.\d+$")  # the image's, where it cannot be probed (pyxis)
    overlay: Optional[str] = "~/.cache/fleetgen/overlays"  # null: the image has fleetgen, nothing is added
    wheels: Optional[str] = None


class Model(_Strict):
    checkpoint: str  # a directory or .nemo file; its format and architecture are read from it
    format: Literal["auto", "hf", "nemo", "megatron", "distckpt"] = "auto"
    tokenizer: Optional[str] = None  # override the checkpoint's tokenizer (a .model, vocab.json dir or tokenizer.json)
    # chat requests and batch records with messages: None, the checkpoint's own template (tokenizer_config.json's
    # chat_template, chat_template.jinja); or a built-in name (nemotron4, chatml); or a jinja file
    chat_template: Optional[str] = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_batch: int = Field(16, ge=1)  # the most sequences decoded together (each a slot of the KV cache's tables)
    # each rank's paged KV cache in GiB (model/kv_cache.py); None: max_seq_len positions for each of max_batch
    # sequences, a static cache's memory
    kv_cache_gb: Optional[float] = Field(None, gt=0)
    prefix_caching: bool = True  # a prompt's leading blocks already in the KV cache are reused, not computed again
    # KV-cache length per slot (prompt + generated); None: the checkpoint's context length. A recipe's value is an
    # upper bound; one given on the command line must fit the model
    max_seq_len: Optional[int] = Field(None, ge=2)
    # torch.compile each layer's parts around attention (model/generate.py); auto: on GPUs only
    compile: Union[bool, Literal["auto"]] = "auto"
    architecture: dict[str, Any] = {}  # expected architecture fields (num_layers: 96); a contradiction fails


class Parallel(_Strict):
    nodes: int = Field(1, ge=1)
    tensor: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)  # independent model instances, each tensor × pipeline ranks with its own server

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.replicas


class Server(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(0, ge=0, le=65535)  # replica r serves on port + r; 0: free ports, read from the job folder
    api_key: Optional[str] = None  # when set, generation requests need `Authorization: Bearer <api_key>` (or the token)
    max_body_bytes: int = Field(4 << 20, ge=1024)
    health_timeout_s: float = Field(900, gt=0)  # launcher: give up (and cancel the job) if not healthy by then
    # torch.distributed timeout of one collective (idle followers are signalled well within it)
    dist_timeout_s: float = Field(18000, gt=0)
    step_timeout_s: float = Field(120, gt=0)  # a step running longer fails its replica (an idle server is never timed)
    heartbeat_timeout_s: float = Field(30, gt=0)  # a rank silent this long (dead or hung) fails its replica


MAX_SENTENCES = 128                     # NeMo's limit of sentences per /generate request
MAX_SEED = 2 ** 63 - 1 - MAX_SENTENCES  # sentence i of a request is seeded with random_seed + i
END_OF_DOCUMENT = "<|endoftext|>"       # NeMo's name for the end-of-document token, whatever the tokenizer


class Generation(BaseModel):
    """NeMo's generation fields with NeMo's defaults (megatron_gpt_eval.py): the body of PUT /generate less its
    sentences, and what a batch record may set. The config's `generation` section starts from these defaults
    (a recipe or KEY=VALUE changes them for a whole batch) and a record's own fields win over it. Checked as
    strictly as the server checks a request, so a record the server would refuse fails before submission."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    tokens_to_generate: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0)                     # 0 = off
    top_p: float = Field(0.9, ge=0, le=1)           # after top-k; 0 or 1 = off
    greedy: bool = False
    add_BOS: bool = False
    repetition_penalty: float = Field(1.0, ge=1.0)  # 1 = off
    min_tokens_to_generate: int = Field(0, ge=0)    # the end-of-document token is banned until then
    end_strings: list[str] = [END_OF_DOCUMENT]
    random_seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    compute_logprob: bool = False
    # fleetgen's: the output is JSON valid under this schema (given inline, or a .json file's path, read here)
    json_schema: Union[None, dict, str] = None

    @field_validator("json_schema")
    @classmethod
    def _compiles(cls, value: Union[None, dict, str]) -> Optional[dict]:
        """A path becomes its schema, so that the server gets the schema itself; llguidance must compile it,
        so that a schema it cannot enforce fails here, naming what it does not support."""
        if value is None:
            return None
        schema = constraints.load_json_schema(value)
        constraints.json_schema(schema)
        return schema


class Batch(_Strict):
    input: Optional[str] = None  # JSONL: fleetgen's {"prompt", "id"?, generation fields?} or OpenAI's batch format
    output: str = "results.jsonl"
    concurrency: int = Field(8, ge=1)  # requests in flight at once, per server (replica)
    prompts_per_request: int = Field(4, ge=1, le=MAX_SENTENCES)  # greedy records (or a record's samples) a request
    samples: int = Field(1, ge=1)  # completions per record; sample j of record k is seeded with hash(seed, k) + j
    seed: int = Field(0, ge=0)  # the batch's seed (a record's own random_seed wins); greedy runs use none
    restart: bool = False  # true: drop OUTPUT's ledger and start over (else a rerun resumes from it)
    max_error_fraction: float = Field(0.1, ge=0, le=1)  # stop once more of all items than this failed
    max_retries: int = Field(5, ge=0)  # attempts per item after a server failure (connection lost, 5xx, timeout)
    request_timeout_s: float = Field(120, gt=0)  # per request: this + timeout_per_token_s × tokens asked
    timeout_per_token_s: float = Field(0.1, ge=0)
    replica_wait_s: float = Field(300, ge=0)  # every server failed: wait this long for one to come back, then stop
    drain_timeout_s: float = Field(60, ge=0)  # when draining (preemption, cancel), how long requests in flight get
    # a prompt too long for the context window with its new tokens, found by the validation pass: error (refuse the
    # batch, naming the lines), skip (into the errors file, no server asked) or truncate_left (keep its end)
    long_prompts: Literal["error", "skip", "truncate_left"] = "error"
    # drivers: record k goes to driver k % shards, each with its own ledger, its share of the replicas (replica r
    # to driver r % shards) and its own process; one merge and audit at the end. For fleets one driver cannot feed
    shards: int = Field(1, ge=1)


class Job(_Strict):
    folder: str = ".fleetgen/jobs"  # one folder per job beneath: logs, server addresses, token, job.json
    name: str = "fleetgen"
    # after a shutdown request, wait this long before cancelling the job; Slurm warns a job (USR2) this long
    # before its time limit, a detached job batch.drain_timeout_s earlier still
    grace_period_s: float = Field(30, ge=0)
    max_requeues: int = Field(3, ge=0)  # detached jobs: requeues at the time limit (preemptions requeue without limit)


class LaunchConfig(_Strict):
    recipe: str  # set by the launcher to the recipe's name
    description: str = ""  # one line, shown by `launch --list`
    # batch: run batch.input through the servers, then tear down | serve: serve until Ctrl-C
    mode: Literal["batch", "serve"] = "batch"
    cluster: Cluster
    container: Container = Container()
    model: Model
    parallel: Parallel = Parallel()
    server: Server = Server()
    generation: Generation = Generation()
    batch: Batch = Batch()
    job: Job = Job()
    detach: bool = False  # batch only: submit one job that runs the whole batch by itself; `launch status` follows it

    @model_validator(mode="after")
    def _detached_jobs_run_batches(self):
        if self.detach and self.mode != "batch":
            raise ValueError("detach=true runs a batch inside the job; a server needs its launcher (use mode=batch)")
        return self

    @model_validator(mode="after")
    def _containers_need_slurm(self):
        if self.container.image and self.cluster.kind != "slurm":
            raise ValueError("container.image is set but cluster.kind is 'local': containers run through "
                             "Slurm (use cluster=slurm, or container=none)")
        return self

    @model_validator(mode="after")
    def _ranks_fill_the_nodes(self):
        """One rank per GPU (or per cluster.tasks_per_node CPU slot): the allocation is exactly the ranks."""
        par, cluster = self.parallel, self.cluster
        if cluster.kind == "local":
            return self._local_ranks_fit()
        if cluster.gpus_per_node is None:
            raise ValueError("cluster.gpus_per_node is null (one GPU a rank, as this machine has them), which only "
                             "cluster=local can settle: give Slurm the GPUs per node (0 for CPU ranks)")
        if cluster.visible_gpus is not None:
            raise ValueError("cluster.visible_gpus is set, but Slurm chooses a node's GPUs: it is for cluster=local")
        if cluster.gpus_per_node:
            per_node, what = cluster.gpus_per_node, "cluster.gpus_per_node"
        elif cluster.tasks_per_node:
            per_node, what = cluster.tasks_per_node, "cluster.tasks_per_node"
        else:
            raise ValueError("cluster.gpus_per_node is 0: set cluster.tasks_per_node to run CPU ranks on Slurm")
        if par.nodes * per_node != par.world_size:
            raise ValueError(f"parallel.tensor × parallel.pipeline × parallel.replicas = {par.tensor} × "
                             f"{par.pipeline} × {par.replicas} = {par.world_size} ranks, but parallel.nodes × "
                             f"{what} = {par.nodes} × {per_node} = {par.nodes * per_node}: they must be equal "
                             "(one rank per GPU)")
        return self

    def _local_ranks_fit(self):
        par, cluster = self.parallel, self.cluster
        if par.nodes != 1:
            raise ValueError(f"parallel.nodes={par.nodes} but cluster=local runs on this one machine; "
                             "use cluster=slurm for several nodes")
        if cluster.gpus_per_node and cluster.gpus_per_node != par.world_size:
            raise ValueError(f"cluster.gpus_per_node={cluster.gpus_per_node} but parallel.tensor × parallel.pipeline "
                             f"× parallel.replicas = {par.tensor} × {par.pipeline} × {par.replicas} = "
                             f"{par.world_size} ranks: a local run puts one rank on each GPU (null: as many GPUs "
                             "as ranks; 0: CPU)")
        if cluster.gpus_per_node == 0 and cluster.visible_gpus:
            raise ValueError(f"cluster.visible_gpus={cluster.visible_gpus} but cluster.gpus_per_node=0 runs on CPU")
        return self

    @model_validator(mode="after")
    def _replica_ports_exist(self):
        last = self.server.port + self.parallel.replicas - 1
        if self.server.port and last > 65535:
            raise ValueError(f"server.port={self.server.port} + parallel.replicas={self.parallel.replicas} - 1 = "
                             f"{last}: replica r serves on server.port + r, which must stay within 65535")
        return self

    @property
    def ranks_per_node(self) -> int:
        if self.cluster.kind == "local":
            return self.parallel.world_size
        return self.cluster.gpus_per_node or self.cluster.tasks_per_node

