"""The REST API's JSON parser: DRF's, refusing what balancer/safe_json.py refuses (the reasons are there)."""

from __future__ import annotations

from rest_framework import parsers
from rest_framework.exceptions import ParseError, ValidationError

from balancer.safe_json import MAX_JSON_DEPTH, UnsafeJSON, check_json


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser (strict: no NaN), which also refuses what ``check_json`` refuses: too deep is a
    parse error, text that cannot be stored a validation error of the top-level field that holds it."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            value = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
        try:
            return check_json(value)
        except UnsafeJSON as exc:
            if exc.field is None:
                raise ParseError(f"JSON parse error - {exc}") from None
            raise ValidationError({exc.field: [exc.problem]}) from None
