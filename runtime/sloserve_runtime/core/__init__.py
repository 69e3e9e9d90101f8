"""The engine-agnostic core: SLO state, step-time model, calibration, speculation, planner, policies.

It imports no vLLM, Ray or HTTP library: the simulator, the router and the unit tests run it alone.
"""
