"""Independent oracles for curvature tests: dense float64 matrices from tf jacobians."""

import numpy as np
import tensorflow as tf


def flat_params(model):
    return tf.concat([tf.reshape(v.value, [-1]) for v in model.trainable_variables], 0)


def unflat(model, flat):
    parts, start = [], 0
    for v in model.trainable_variables:
        size = int(np.prod(v.shape))
        parts.append(tf.reshape(flat[start : start + size], v.shape))
        start += size
    return parts


def dense_hessian(model, mean_loss_of_outputs, x):
    """d^2/dtheta^2 of mean_loss_of_outputs(model(x)) as a dense array (jacobian of gradient)."""
    theta = flat_params(model)
    non_trainable = [v.value for v in model.non_trainable_variables]
    with tf.GradientTape() as outer:
        outer.watch(theta)
        with tf.GradientTape() as inner:
            inner.watch(theta)
            out, _ = model.stateless_call(unflat(model, theta), non_trainable, x)
            loss = mean_loss_of_outputs(out)
        grad = inner.gradient(loss, theta)
    return outer.jacobian(grad, theta).numpy()


def dense_ggn(model, mean_loss_of_outputs, x):
    """J^T H_out J with J the full output jacobian and H_out the output Hessian (dense)."""
    theta = flat_params(model)
    non_trainable = [v.value for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(theta)
        out, _ = model.stateless_call(unflat(model, theta), non_trainable, x)
    jac = tape.jacobian(out, theta).numpy().reshape(-1, theta.shape[0])
    fixed = tf.constant(out.numpy())
    with tf.GradientTape() as outer:
        outer.watch(fixed)
        with tf.GradientTape() as inner:
            inner.watch(fixed)
            loss = mean_loss_of_outputs(fixed)
        g = tf.reshape(inner.gradient(loss, fixed), [-1])
    h_out = outer.jacobian(g, fixed).numpy().reshape(g.shape[0], -1)
    return jac.T @ h_out @ jac
