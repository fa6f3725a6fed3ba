"""Model backends behind two small interfaces (DESIGN rule 5). Concrete backends are imported lazily."""
