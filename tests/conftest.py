import os

# DeepSpeed must pick its CPU accelerator on machines without a GPU (dev boxes and CI).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures.servers", "tests.fixtures.ray_nodes", "tests.fixtures.media",
                  "tests.fixtures.threads", "tests.fixtures.pretrain_run"]
