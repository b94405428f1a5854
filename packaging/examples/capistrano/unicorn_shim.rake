# Capistrano 3: publish a release through unicorn-shim, the first server (the
# canary) first, then the others one at a time, with the fleet's outcome.
#
# Load it from the Capfile, after `require "capistrano/deploy"`:
#   import "/usr/share/doc/unicorn-shim/examples/capistrano/unicorn_shim.rake"
# (or copy it to lib/capistrano/tasks/, which the default Capfile imports).
#
# It replaces deploy:symlink:release, which points current at the new release
# on every server at once: here each server in turn gets current pointed at
# the release and the app reloaded with `unicorn-shim reload APP`, which
# returns only once the new release serves. The first server whose reload
# fails gets current pointed back at the release that serves; the servers
# after it are not touched, and the servers before it are put back on the
# release they served before (current pointed back, reloaded). The deploy's
# last lines say what each server serves; a failure is raised once, with the
# shim's reason. `cap STAGE deploy:rollback` goes through the same steps.
#
# Settings:
#   :unicorn_shim_app      the app's name in /etc/unicorn-shim/APP.conf (default: :application)
#   :unicorn_shim_user     the app's user, USER= of APP.conf (default: the app's name)
#   :unicorn_shim_roles    the roles that run the app (default: :app)
#   :unicorn_shim_reload   the reload command, an array (default, as root: unicorn-shim reload APP;
#                          as another user: sudo -n -u APP_USER unicorn-shim reload APP, for the
#                          packaged sudoers example; with the packaged polkit rule:
#                          %w[systemctl reload unicorn-shim@APP.service])
#   :unicorn_shim_flip_back       point current back after a failed reload (default: true)
#   :unicorn_shim_fleet_rollback  put the servers before a failed one back (default: true)

module UnicornShimFleet
  module_function

  # Points current at `target` on the server of `backend`: a new link renamed
  # over the old one, so current is never missing.
  def point_current(backend, current, target)
    next_link = current.parent.join(".#{current.basename}.next")
    backend.execute :ln, "-sfn", target, next_link
    backend.execute :mv, "-T", next_link, current
  end

  # Runs the reload; nil when the new release serves, else the reason.
  def reload(backend, argv, unit)
    backend.execute(*argv, verbosity: :DEBUG)   # its output once, in the outcome, not live as well
    nil
  rescue SSHKit::Command::Failed => e
    said = e.message[/ stderr: (.*)\z/m, 1].to_s.strip
    return said unless said.include?("Job for")  # systemctl's "Job ... failed": the shim's own words are in its status
    status = backend.capture(:systemctl, :show, "-p", "StatusText", "--value", unit, raise_on_non_zero_exit: false)
    status[/last reload failed .*/] || said
  end

  # The release the server's master serves, from systemd's copy of the shim's
  # status line (any user may read it); only the path reaches the log.
  def serves(backend, unit)
    path = backend.capture("systemctl show -p StatusText --value #{unit} | " \
                           "sed -n 's/.*, release \\([^,]*\\), generation.*/\\1/p'", raise_on_non_zero_exit: false)
    path.empty? ? nil : path
  end

  def line(server, state, release, failed)
    serving = state[:serves] ? "serves #{File.basename(state[:serves])}" : "serves nothing (not running)"
    why = {
      published: "took #{release}#{failed ? ', not rolled back: :unicorn_shim_fleet_rollback is false' : ''}",
      failed: "#{release} failed here: #{state[:reason]}",
      rolled_back: "had taken #{release}, rolled back",
      rollback_failed: "had taken #{release}; its rollback failed: #{state[:reason]}",
      untouched: failed ? "not reached: a server before it failed" : "not reached"
    }[state[:outcome]]
    "#{server}: #{serving} (#{why})"
  end
end

namespace :unicorn_shim do
  desc "Publish the release through unicorn-shim: the canary first, then one server at a time"
  task :publish do
    app = fetch(:unicorn_shim_app) { fetch(:application) }
    user = fetch(:unicorn_shim_user, app)
    unit = "unicorn-shim@#{app}.service"
    servers = roles(fetch(:unicorn_shim_roles, :app))
    release, current = release_path, current_path
    flip_back = fetch(:unicorn_shim_flip_back, true)
    fleet = Hash.new { |h, server| h[server] = { outcome: :untouched } }
    argv = lambda do |backend|
      fetch(:unicorn_shim_reload) do
        root = backend.capture(:id, "-u") == "0"
        (root ? [] : ["sudo", "-n", "-u", user]) + ["unicorn-shim", "reload", app]
      end
    end
    failed = nil
    # SSHKit waits 2 s between servers by default (wait:): nothing to wait for here
    on servers, in: :sequence, wait: 0 do |server|
      next if failed
      state = fleet[server]
      state[:previous] = capture(:readlink, "-e", current, raise_on_non_zero_exit: false)
      state[:argv] = argv.call(self)
      UnicornShimFleet.point_current(self, current, release)
      state[:reason] = UnicornShimFleet.reload(self, state[:argv], unit)
      if state[:reason].nil?
        state[:outcome] = :published
        next
      end
      state[:outcome] = :failed
      failed = server
      UnicornShimFleet.point_current(self, current, state[:previous]) if flip_back && !state[:previous].empty?
    end
    if failed && fetch(:unicorn_shim_fleet_rollback, true)
      took = servers.select { |s| fleet[s][:outcome] == :published && !fleet[s][:previous].empty? }
      on took, in: :parallel do |server|
        state = fleet[server]
        UnicornShimFleet.point_current(self, current, state[:previous])
        state[:reason] = UnicornShimFleet.reload(self, state[:argv], unit)
        state[:outcome] = state[:reason] ? :rollback_failed : :rolled_back
      end
    end
    serving = {}
    on servers, in: :parallel do |server|
      serving[server] = UnicornShimFleet.serves(self, unit)
    end
    name = release.basename.to_s
    on_new = servers.select { |s| (fleet[s][:serves] = serving[s]) && File.basename(serving[s]) == name }
    lines = servers.map { |s| "  " + UnicornShimFleet.line(s, fleet[s], name, failed) }
    if failed.nil? && on_new.size == servers.size
      run_locally { ["unicorn-shim: #{app}: every server serves #{name}", *lines].each { |line| info line } }
      next
    end
    outcome = if on_new.empty?
                "no server serves #{name}: every server serves the release it served before"
              else
                "the fleet is mixed: #{on_new.join(', ')} serve#{on_new.size == 1 ? 's' : ''} #{name}"
              end
    summary = "unicorn-shim: #{app}: #{name} failed#{failed ? " on #{failed}" : ''}; #{outcome}"
    # The fleet, with the reason, is said once: last, after deploy:failed (whose
    # log tail would bury it), or here when this task runs outside a deploy.
    set :unicorn_shim_fleet, [summary, *lines]
    invoke "unicorn_shim:fleet" unless fetch(:deploying, false)
    raise summary
  end

  task :fleet do
    $stderr.puts(*fetch(:unicorn_shim_fleet, []))
  end
end

after "deploy:failed", "unicorn_shim:fleet"

Rake::Task["deploy:symlink:release"].clear_actions
namespace :deploy do
  namespace :symlink do
    task :release do
      invoke "unicorn_shim:publish"
    end
  end
end
