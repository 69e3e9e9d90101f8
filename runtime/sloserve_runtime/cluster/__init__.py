"""Replicas on Ray behind one endpoint: the replicas, the gateway that routes to them, the deployment."""
