"""Server interceptors: per-call request context, logging and error mapping."""

from service.interceptors.request_context import RequestContextInterceptor

__all__ = ["RequestContextInterceptor"]
