"""The composed config's types: Hydra composes YAML, these models check every value and name the bad one."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleetgen.launcher.errors import LaunchError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cluster(_Strict):
    kind: Literal["local", "slurm"]
    gpus_per_node: int = Field(0, ge=0)
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


class Container(_Strict):
    image: Optional[str] = None
    mounts: list[str] = []
    workdir: Optional[str] = None
    mount_home: bool = False


class Model(_Strict):
    checkpoint: str
    format: Literal["auto", "hf", "nemo", "megatron", "distckpt"] = "auto"
    tokenizer: Optional[str] = None
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    max_batch: int = Field(16, ge=1)
    max_seq_len: int = Field(1024, ge=2)
    compile: Union[bool, Literal["auto"]] = "auto"
    architecture: dict[str, Any] = {}


class Parallel(_Strict):
    nodes: int = Field(1, ge=1)
    tensor: int = Field(1, ge=1)
    pipeline: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.replicas


class Server(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(0, ge=0, le=65535)
    api_key: Optional[str] = None
    max_body_bytes: int = Field(4 << 20, ge=1024)
    health_timeout_s: float = Field(900, gt=0)
    dist_timeout_s: float = Field(18000, gt=0)


class Generation(_Strict):
    """Defaults for batch records, in NeMo's field names (a record's own fields win)."""
    tokens_to_generate: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, le=100)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.9, ge=0, le=1)
    greedy: bool = False
    add_BOS: bool = False
    repetition_penalty: float = Field(1.0, ge=1.0)
    min_tokens_to_generate: int = Field(0, ge=0)
    end_strings: list[str] = ["<|endoftext|>"]
    random_seed: Optional[int] = Field(None, ge=0)
    compute_logprob: bool = False


class Batch(_Strict):
    input: Optional[str] = None
    output: str = "results.jsonl"
    concurrency: int = Field(8, ge=1)
    prompts_per_request: int = Field(4, ge=1, le=128)


class Job(_Strict):
    folder: str = ".fleetgen/jobs"
    name: str = "fleetgen"
    grace_period_s: float = Field(30, ge=0)


class LaunchConfig(_Strict):
    recipe: str
    description: str = ""
    mode: Literal["batch", "serve"] = "batch"
    cluster: Cluster
    container: Container = Container()
    model: Model
    parallel: Parallel = Parallel()
    server: Server = Server()
    generation: Generation = Generation()
    batch: Batch = Batch()
    job: Job = Job()

    @model_validator(mode="after")
    def _containers_need_slurm(self):
        if self.container.image and self.cluster.kind != "slurm":
            raise ValueError("container.image is set but cluster.kind is 'local': containers run through "
                             "Slurm's pyxis (use cluster=slurm, or container=none)")
        return self

    @model_validator(mode="after")
    def _ranks_fill_the_nodes(self):
        """One rank per GPU (or per cluster.tasks_per_node CPU slot): the allocation is exactly the ranks."""
        par, cluster = self.parallel, self.cluster
        if cluster.kind == "local":
            if par.nodes != 1:
                raise ValueError(f"parallel.nodes={par.nodes} but cluster=local runs on this one machine; "
                                 "use cluster=slurm for several nodes")
            return self
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

    @property
    def ranks_per_node(self) -> int:
        if self.cluster.kind == "local":
            return self.parallel.world_size
        return self.cluster.gpus_per_node or self.cluster.tasks_per_node


def parse(data: dict) -> LaunchConfig:
    try:
        return LaunchConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
                             + (f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else "")
                             for err in e.errors())
        raise LaunchError(f"invalid config: {problems}") from None
