"""The HTTP layer's parts that are not routes: auth, body limits, relaying replica streams, errors."""
