"""The OpenAPI schema's error answers (every operation lists the 4xx it can give, with their bodies) and its
sign-in schemes, explained where Swagger UI's Authorize shows them."""

from __future__ import annotations

from django.urls import reverse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import inline_serializer
from rest_framework import serializers

ErrorSerializer = inline_serializer("Error", {"detail": serializers.CharField()})

_ERRORS = {
    "400": (OpenApiTypes.OBJECT, "Invalid request: each field's name maps to a list of messages."),
    "401": (ErrorSerializer, "No or an invalid token / session."),
    "403": (ErrorSerializer, "Not allowed (e.g. a session request without its CSRF token)."),
    "404": (ErrorSerializer, "No such object among yours (another user's object answers 404 too)."),
    "429": (ErrorSerializer, "Too many requests; Retry-After says when to try again."),
}


class ErrorAnswersSchema(AutoSchema):
    """drf-spectacular's schema plus the error answers: 400 (a body or a query), 401, 403, 404 (by id, or a page
    past the last), 429 (POST)."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        codes = ["401", "403"]
        parameters = self._get_parameters()
        if self.method in ("POST", "PUT", "PATCH") or any(p.get("in") == "query" for p in parameters):
            codes.append("400")
        if "{" in self.path or any(p.get("name") == "page" for p in parameters):
            codes.append("404")
        if self.method == "POST":
            codes.append("429")
        for code in sorted(codes):
            if code not in responses:
                body, description = _ERRORS[code]
                responses[code] = self._get_response_for_code(body, code, direction=direction)
                responses[code]["description"] = description
        return dict(sorted(responses.items()))


def job_create_needs_one_recipe(result, generator, request, public):
    """A postprocessing hook: a job's request names exactly one of a preset and a custom recipe (the serializer's
    rule, JobCreateSerializer.validate), stated in the schema, so a client or a fuzzer knows it before asking."""
    result["components"]["schemas"]["JobCreateRequest"]["oneOf"] = [
        {"required": ["preset"], "properties": {"preset": {"$ref": "#/components/schemas/PresetEnum"}}},
        # A recipe counts when it has a character other than white space.
        {"required": ["recipe_yaml"], "properties": {"recipe_yaml": {"type": "string", "pattern": "\\S"}}},
    ]
    return result


class TokenScheme(OpenApiAuthenticationExtension):
    """The API token, as Swagger UI's Authorize asks for it: the whole header value, where to get the key."""

    target_class = "jobs.api.authentication.TokenAuthentication"
    name = "tokenAuth"
    priority = 1  # over drf-spectacular's own scheme for DRF's TokenAuthentication, which this one subclasses

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": (
                "Your API token, for programs and the CLI. Create, rotate or revoke it on the page "
                f"[{reverse('frontend:api-token')}]({reverse('frontend:api-token')}) (signed in); the key is "
                "shown once. In Authorize, enter `Token <key>`: the word Token, a space, then the key."
            ),
        }


class SessionScheme(OpenApiAuthenticationExtension):
    """The pages' session, as Swagger UI's Authorize lists it: nothing to enter when signed in."""

    target_class = "rest_framework.authentication.SessionAuthentication"
    name = "cookieAuth"
    priority = 1  # over drf-spectacular's own scheme for it

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "cookie",
            "name": "sessionid",
            "description": (
                "The session of the pages: signed in on this server, this docs page's requests use it (with "
                "the CSRF token the page sends). Nothing to enter here."
            ),
        }
