"""Task heads, one module a task family: raw outputs -> results shaped like the transformers pipelines."""
