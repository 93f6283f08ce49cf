"""What runs at call time: stacked weights kept in step with the model, prepare, the traced vmap replay."""
