// django-rq's job and worker lists call django.jQuery(...).actions(), a jQuery plugin Django's
// admin no longer ships (its actions.js now sets itself up on load). Deferred, this runs once the
// page is parsed and before jQuery's ready callbacks: the call becomes a no-op, not an error.
if (window.django && window.django.jQuery && !window.django.jQuery.fn.actions) {
  window.django.jQuery.fn.actions = function () { return this; };
}
