"""``corral sim``: a simulated fleet of node agents in one process (see ``worker.sim.fleet``)."""

from worker.sim.fleet import SimFleet
from worker.sim.profiles import NodeProfile, fleet_profiles

__all__ = ["NodeProfile", "SimFleet", "fleet_profiles"]
