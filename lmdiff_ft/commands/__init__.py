"""Commands besides training: thin functions over the layers below (eval, inspect, merge, env)."""
