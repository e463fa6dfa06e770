"""ServerApp: FedAvg over one float32 array of `floats` values for `num-server-rounds` rounds;
writes each round's wall time (from configuring the round's training to the end of its
aggregation and its, empty, evaluation stage) to `timing-file` as JSON."""
import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started, self.seconds = {}, []

    def configure_train(self, server_round, arrays, config, grid):
        self.started[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        result = super().aggregate_evaluate(server_round, replies)
        self.seconds.append(time.perf_counter() - self.started[server_round])
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n, rounds, nodes = int(cfg["floats"]), int(cfg["num-server-rounds"]), int(cfg["min-nodes"])
    array = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                           min_available_nodes=nodes)
    t = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([array]), num_rounds=rounds)
    total = time.perf_counter() - t
    final = result.arrays.to_numpy_ndarrays()[0]
    if cfg["timing-file"]:
        with open(str(cfg["timing-file"]), "w") as f:
            json.dump({"round_seconds": strategy.seconds, "total_seconds": total,
                       "echo_close": bool(np.allclose(final, array))}, f)
