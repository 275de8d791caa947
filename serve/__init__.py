"""Ray Serve application serving the registry champion (see the inference-service work)."""
