"""trainer.distributed: config validation, environment overrides, cluster detection, GPU layouts.

These only resolve settings (no jax.distributed call); the multi-process runs are in
test_launch_local.py and test_slurm.py.
"""

from __future__ import annotations

import pytest

from trainer.distributed import DistributedConfig, parse_device_ids, resolve

CLUSTER_VARS = ("TRAINER_", "SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES", "OMPI_", "TPU_", "MEGASCALE_")


@pytest.fixture
def env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith(CLUSTER_VARS):
            monkeypatch.delenv(k)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    return monkeypatch


def slurm(env, ntasks, tasks_per_node, localid=0, procid=0, nodeid=0, **extra):
    env.setenv("SLURM_JOB_ID", "1234")
    env.setenv("SLURM_STEP_NODELIST", "node[01-02]")
    env.setenv("SLURM_NTASKS", str(ntasks))
    env.setenv("SLURM_STEP_NUM_TASKS", str(ntasks))
    env.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)
    env.setenv("SLURM_PROCID", str(procid))
    env.setenv("SLURM_LOCALID", str(localid))
    env.setenv("SLURM_NODEID", str(nodeid))
    for k, v in extra.items():
        env.setenv(k, v)


@pytest.mark.parametrize("field,value,msg", [
    ("enabled", "maybe", "distributed.enabled"),
    ("coordinator", "nohostport", "distributed.coordinator"),
    ("num_processes", 0, "distributed.num_processes"),
    ("process_id", -1, "distributed.process_id"),
    ("local_device_ids", "0,x", "distributed.local_device_ids"),
    ("local_device_ids", "1,1", "distributed.local_device_ids"),
    ("initialization_timeout", 0, "distributed.initialization_timeout"),
])
def test_validate_names_the_field(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        DistributedConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match="distributed.process_id"):
        DistributedConfig(num_processes=2, process_id=2).validate()


def test_parse_device_ids():
    assert parse_device_ids("0,1, 2") == [0, 1, 2]
    assert parse_device_ids(3) == [3]
    assert parse_device_ids([0, 1]) == [0, 1]
    assert parse_device_ids("all") == "all"


def test_single_process_by_default(env):
    r = resolve(DistributedConfig())
    assert not r.enabled and r.source == "no cluster detected"


def test_env_overrides_config(env):
    env.setenv("TRAINER_COORDINATOR", "10.0.0.1:1234")
    env.setenv("TRAINER_NUM_PROCESSES", "4")
    env.setenv("TRAINER_PROCESS_ID", "3")
    env.setenv("TRAINER_CPU_DEVICES", "2")
    env.setenv("TRAINER_INIT_TIMEOUT", "7")
    r = resolve(DistributedConfig(coordinator="1.2.3.4:5", num_processes=2, process_id=0), cpu_devices=8)
    assert r.enabled and r.coordinator == "10.0.0.1:1234"
    assert (r.num_processes, r.process_id, r.cpu_devices, r.timeout) == (4, 3, 2, 7)


def test_config_alone_and_off_switch(env):
    cfg = DistributedConfig(coordinator="h:1", num_processes=2, process_id=1)
    assert resolve(cfg).enabled
    assert not resolve(DistributedConfig(enabled=False, coordinator="h:1")).enabled  # YAML `off`
    assert resolve(DistributedConfig(enabled=True)).enabled  # YAML `on`
    env.setenv("TRAINER_DISTRIBUTED", "off")
    assert not resolve(cfg).enabled
    env.setenv("TRAINER_PROCESS_ID", "5")
    with pytest.raises(ValueError, match="process id 5"):
        resolve(cfg)


def test_slurm_step_detected_only_with_several_tasks(env):
    slurm(env, ntasks=1, tasks_per_node="1")
    assert not resolve(DistributedConfig()).enabled
    slurm(env, ntasks=2, tasks_per_node="2")
    r = resolve(DistributedConfig())
    assert r.enabled and "Slurm" in r.source
    assert r.coordinator is None and r.process_id is None  # left to JAX's Slurm auto-detection


def test_slurm_gpu_layouts(env):
    env.setenv("JAX_PLATFORMS", "cuda")
    # One task per node, all 8 GPUs visible: the task drives all of them (not just GPU 0).
    slurm(env, ntasks=2, tasks_per_node="1(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert resolve(DistributedConfig()).local_device_ids == list(range(8))
    # One task per GPU, Slurm bound one GPU per task (--gpus-per-task=1): CUDA ordinal 0.
    slurm(env, ntasks=16, tasks_per_node="8(x2)", localid=5, CUDA_VISIBLE_DEVICES="5")
    assert resolve(DistributedConfig()).local_device_ids == [0]
    # One task per GPU, every task sees the whole node: GPU SLURM_LOCALID.
    slurm(env, ntasks=16, tasks_per_node="8(x2)", localid=5, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert resolve(DistributedConfig()).local_device_ids == [5]
    # Two tasks per node with 4 GPUs each, all visible: an equal slice.
    slurm(env, ntasks=4, tasks_per_node="2(x2)", localid=1, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert resolve(DistributedConfig()).local_device_ids == [4, 5, 6, 7]
    # Explicit ids win; "all" means every visible GPU.
    env.setenv("JAX_LOCAL_DEVICE_IDS", "2,3")
    assert resolve(DistributedConfig()).local_device_ids == [2, 3]
    env.delenv("JAX_LOCAL_DEVICE_IDS")
    assert resolve(DistributedConfig(local_device_ids="all")).local_device_ids == list(range(8))
    # SLURM_STEP_GPUS when CUDA_VISIBLE_DEVICES is absent.
    env.delenv("CUDA_VISIBLE_DEVICES")
    slurm(env, ntasks=2, tasks_per_node="1(x2)", SLURM_STEP_GPUS="4,5,6,7")
    assert resolve(DistributedConfig()).local_device_ids == [0, 1, 2, 3]


def test_cpu_slurm_leaves_device_ids_alone(env):
    slurm(env, ntasks=2, tasks_per_node="2", CUDA_VISIBLE_DEVICES="0")
    assert resolve(DistributedConfig(), cpu_devices=4).local_device_ids is None
