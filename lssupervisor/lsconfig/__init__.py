"""The Lightning Stream config: Go ``${VAR}`` expansion, LS's value types and schema, rendering our
template for a schema version, and checks with the LS binary."""
