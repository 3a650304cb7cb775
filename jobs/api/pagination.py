"""The API's pages: DRF's page numbers, with an empty `?page=` refused as the schema says (an integer)."""

from __future__ import annotations

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination


class StrictPageNumberPagination(PageNumberPagination):
    """DRF reads an empty `?page=` as page 1; here it is a 400 naming `page`, as any other page that is no number."""

    def get_page_number(self, request, paginator):
        number = request.query_params.get(self.page_query_param)
        if number is not None and not number.isdigit() and number not in self.last_page_strings:
            raise ValidationError({self.page_query_param: ["Give a page number: 1, 2, ..."]})
        return super().get_page_number(request, paginator)
