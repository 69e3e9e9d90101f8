"""Replicas as a Ray Serve application: the engine replicas, the ingress, our request router and autoscaling policy."""
