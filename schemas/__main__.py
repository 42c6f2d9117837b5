"""`python -m schemas`: regenerate schemas/json/*.schema.json from the pydantic models."""

from schemas.export import write_schemas

if __name__ == "__main__":
    for path in write_schemas():
        print(path)
