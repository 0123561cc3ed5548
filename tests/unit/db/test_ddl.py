"""tables/*.sql is the DDL generated from the models, kept in the repository and in sync."""

from __future__ import annotations

import pytest

from holdwall_stream.db.models import Base
from holdwall_stream.db.schema import DDL_FILES, TABLES_DIR, render_ddl


@pytest.mark.parametrize("dialect", sorted(DDL_FILES))
def test_tables_sql_matches_models(dialect: str) -> None:
    path = TABLES_DIR / DDL_FILES[dialect]
    assert path.exists(), f"{path} is missing: run `make ddl`"
    assert path.read_text() == render_ddl(dialect), (
        f"{path} differs from the DDL generated from holdwall_stream/db/models.py: run `make ddl`"
    )


@pytest.mark.parametrize("dialect", sorted(DDL_FILES))
def test_rendered_ddl_creates_every_model_table(dialect: str) -> None:
    ddl = render_ddl(dialect)
    for table in Base.metadata.tables:
        assert f"CREATE TABLE {table} (" in ddl
