"""Traffic simulator: predict requests from a unit population at a fixed rate, true labels posted as feedback.

    from simulator import run
    summary = run("http://127.0.0.1:8808", "fraud", rate=50, duration=60, units=1000, label_delay=5, seed=1)

or `python -m simulator --url http://127.0.0.1:8808 --model fraud --rate 50 --duration 60`.
"""

from simulator.traffic import Simulation, SimulationConfig, check_loopback, run

__all__ = ["Simulation", "SimulationConfig", "check_loopback", "run"]
