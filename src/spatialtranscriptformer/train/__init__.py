"""Lightning training plans and data loading for the modules."""
