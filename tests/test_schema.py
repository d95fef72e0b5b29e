"""The config's types (conf/schema.py): the layout rule, and NeMo's generation fields defined once for batch
records and the server."""
import pytest
from pydantic import ValidationError

from fleetgen.conf.schema import MAX_SEED, Generation
from fleetgen.model.serve.request_schemas import GenerateRequest
from tests.goldens import composed


def test_ranks_must_fill_the_nodes_slots():
    with pytest.raises(ValidationError, match=r"parallel.tensor × parallel.pipeline × parallel.replicas = 2 × 1 × 1 "
                                              r"= 2 ranks, but parallel.nodes × cluster.gpus_per_node = 1 × 4 = 4: "
                                              r"they must be equal \(one rank per GPU\)"):
        composed("cluster=slurm", "cluster.gpus_per_node=4", "parallel.tensor=2")
    with pytest.raises(ValidationError, match="parallel.nodes × cluster.tasks_per_node = 2 × 3 = 6"):
        composed("cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=3", "parallel.nodes=2",
                 "parallel.tensor=4")


def test_the_server_and_the_batch_share_neMos_generation_defaults():
    request = GenerateRequest(sentences=["a"]).model_dump(include=set(Generation.model_fields))
    assert request == Generation().model_dump()
    assert composed().generation == Generation()  # no recipe: NeMo's defaults
    assert Generation().tokens_to_generate == 64 and Generation().greedy is False


def test_a_recipe_or_the_command_line_changes_the_batch_defaults():
    cfg = composed("generation.greedy=true", "generation.top_k=5")
    assert (cfg.generation.greedy, cfg.generation.top_k, cfg.generation.tokens_to_generate) == (True, 5, 64)


@pytest.mark.parametrize("field, value", [("random_seed", MAX_SEED + 1), ("random_seed", -1), ("greedy", "yes"),
                                          ("tokens_to_generate", 0), ("temperature", float("nan"))])
def test_a_value_the_server_refuses_is_refused_before_submission(field, value):
    with pytest.raises(ValidationError, match=field):
        Generation.model_validate({field: value})
    with pytest.raises(ValidationError, match=field):
        GenerateRequest.model_validate({"sentences": ["a"], field: value})
